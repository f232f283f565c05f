"""`submitter.py EFFECTS_LOG ACKS_LOG`: enqueue t.chaos jobs in small batches until killed,
appending the ids of each committed batch to ACKS_LOG. The sqlite-kills scenario kills it
-9 at any moment: every job it acknowledged must be in the database afterwards."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from infra import boot  # noqa: E402
from core import jobs  # noqa: E402
from core import submission  # noqa: E402
from models import DB_ERRORS, reset_connection  # noqa: E402

BATCH = 5
PAUSE_S = 0.1


def main(effects_log, acks):
    rules = submission.Rules.from_settings(boot.start())
    batch = [submission.validate_submission({"type": "t.chaos", "payload": {"log": effects_log}},
                                            rules)] * BATCH
    while True:
        try:
            ids = [job.id for job, _ in jobs.enqueue(batch)]
        except DB_ERRORS:
            reset_connection()
            continue
        line = " ".join(map(str, ids)) + "\n"
        fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        time.sleep(PAUSE_S)


if __name__ == "__main__":
    main(*sys.argv[1:3])
