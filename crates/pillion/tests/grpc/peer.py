# A real gRPC peer (grpcio), without generated code: methods carry raw bytes.
#
#   peer.py server PORT        serves every method on 127.0.0.1:PORT: the answer is
#                              "path=<method path>;<request>"; /slow.Svc/Wait sleeps 30 s
#   peer.py call ADDR PATH [KEY=VALUE ...]
#                              calls PATH through ADDR with b"ping" and the metadata,
#                              with a 20 s deadline, and prints one JSON line:
#                              {"ok": "<answer>"} or {"code": "UNAVAILABLE", "details": "..."}
import json
import sys
import time
from concurrent import futures

import grpc


class Everything(grpc.GenericRpcHandler):
    def service(self, details):
        path = details.method

        def answer(request, context):
            if path == "/slow.Svc/Wait":
                time.sleep(30)
            return b"path=" + path.encode() + b";" + request

        return grpc.unary_unary_rpc_method_handler(answer)


def serve(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Everything(),))
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    server.wait_for_termination()


def call(addr, path, metadata):
    with grpc.insecure_channel(addr, options=[("grpc.enable_http_proxy", 0)]) as channel:
        method = channel.unary_unary(path)
        try:
            answer = method(b"ping", timeout=20, metadata=metadata)
            print(json.dumps({"ok": answer.decode()}))
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        pairs = [a.split("=", 1) for a in sys.argv[4:]]
        call(sys.argv[2], sys.argv[3], [(k, v) for k, v in pairs])
