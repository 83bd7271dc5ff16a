# micro's own example RPC server for its sidecar, examples/greeter/server/python/
# sidecar_server.py of micro v0.x (micro/micro at f4a1f0e9), unchanged but for:
# - the sidecar's address and this server's port come from the command line (the
#   example's are fixed: localhost:8081 and 4000), and it serves on 127.0.0.1;
# - two more methods, for the error cases (marked below).
# usage: python3 sidecar_server.py SIDECAR_HOST:PORT SERVER_PORT
import sys

from werkzeug.wrappers import Request, Response
from werkzeug.serving import run_simple
from jsonrpc import JSONRPCResponseManager, dispatcher

import uuid
import requests
import json

SIDECAR = sys.argv[1]
PORT = int(sys.argv[2])


def register():
    register_uri = "http://%s/registry" % SIDECAR
    service = "go.micro.srv.greeter"
    headers = {'content-type': 'application/json'}
    payload = {
        "name": service,
        "nodes": [{
            "id": service + "-" + str(uuid.uuid4()),
            "address": "127.0.0.1",
            "port": PORT,
        }],
    }
    requests.post(register_uri, data=json.dumps(payload), headers=headers)


def fail(request):  # added: an exception in a method
    raise ValueError("no greeting for " + request["name"])


@Request.application
def application(request):
    # Dispatcher is dictionary {<method_name>: callable}
    dispatcher["Say.Hello"] = lambda s: "hello " + s["name"]
    dispatcher["Say.Fail"] = fail  # added
    dispatcher["Say.Echo"] = lambda s: s  # added: the request as the server read it

    response = JSONRPCResponseManager.handle(
        request.data, dispatcher)
    return Response(response.json, mimetype='application/json')


if __name__ == '__main__':
    register()
    run_simple('127.0.0.1', PORT, application)
