"""Jobs keep the latest progress their handler reported (`ctx.progress`, SPEC §12): any
JSON value, stored as its text, null until the first report."""


def up(migrator, db):
    db.execute_sql("ALTER TABLE jobs ADD COLUMN progress TEXT")
