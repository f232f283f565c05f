"""`echo`: returns its payload. The smallest handler, for trying Conveyor out."""
from handlers import handler


@handler("echo", schema={"type": "object"})
def echo(payload, ctx):
    ctx.log.info("echoing %d keys", len(payload))
    return payload
