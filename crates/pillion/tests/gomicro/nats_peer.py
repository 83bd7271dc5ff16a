# A go-micro service's side of NATS, with nats-py: messages as go-micro's NATS broker
# writes and reads them (go-micro v1.18.0 broker/nats/nats.go with the default JSON
# codec: Go's encoding/json of broker.Message{Header map[string]string; Body []byte},
# so Body is standard base64).
#
#   nats_peer.py sub NATS_URL SUBJECT   prints the first message as JSON
#                                       {"Header": {...}, "Body": "<text>"}
#   nats_peer.py pub NATS_URL SUBJECT HEADER_JSON BODY
import asyncio
import base64
import json
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
        m = json.loads(msg.data)
        print(json.dumps({"Header": m["Header"], "Body": base64.b64decode(m["Body"]).decode()}), flush=True)
    else:
        header, body = json.loads(sys.argv[4]), sys.argv[5]
        payload = {"Header": header, "Body": base64.b64encode(body.encode()).decode()}
        await nc.publish(subject, json.dumps(payload).encode())
        await nc.flush()
    await nc.close()


asyncio.run(main())
