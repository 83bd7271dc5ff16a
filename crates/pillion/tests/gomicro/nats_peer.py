# The NATS side of a go-micro service, with nats-py: it carries payloads as they are
# (tests/gomicro/broker_message.go makes and reads them with Go's encoding/json, as
# go-micro's NATS broker does).
#
#   nats_peer.py sub NATS_URL SUBJECT           prints "subscribed", then the first
#                                               payload on one line
#   nats_peer.py pub NATS_URL SUBJECT PAYLOAD   publishes PAYLOAD as it is
import asyncio
import sys

import nats


async def main():
    mode, url, subject = sys.argv[1:4]
    nc = await nats.connect(url)
    if mode == "sub":
        sub = await nc.subscribe(subject)
        await nc.flush()
        print("subscribed", flush=True)
        msg = await sub.next_msg(timeout=20)
        print(msg.data.decode(), flush=True)
    else:
        await nc.publish(subject, sys.argv[4].encode())
        await nc.flush()
    await nc.close()


asyncio.run(main())
