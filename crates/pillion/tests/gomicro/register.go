// Registers services with a pillion sidecar exactly as a go-micro app does, reads them
// back into go-micro's own types, and calls one through /rpc the go-micro v1 way.
// Standard library only: third-party Go modules cannot be downloaded where the tests
// run. Run by crates/pillion/tests/go_micro.rs; prints what failed and exits 1.
//
//	go run register.go -sidecar http://127.0.0.1:8081 -node 127.0.0.1:9090 \
//	    -app go.micro.srv.app -app-address 127.0.0.1:9091
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
)

// go-micro's registry types, copied with their JSON tags from
// github.com/micro/go-micro registry/service.go, v0.8.0 (the go-micro of micro's
// sidecar, 2018); the file is the same from v0.3.0 to v1.9.1. v1.10.0 removed Port.

type Service struct {
	Name      string            `json:"name"`
	Version   string            `json:"version"`
	Metadata  map[string]string `json:"metadata"`
	Endpoints []*Endpoint       `json:"endpoints"`
	Nodes     []*Node           `json:"nodes"`
}

type Node struct {
	Id       string            `json:"id"`
	Address  string            `json:"address"`
	Port     int               `json:"port"`
	Metadata map[string]string `json:"metadata"`
}

type Endpoint struct {
	Name     string            `json:"name"`
	Request  *Value            `json:"request"`
	Response *Value            `json:"response"`
	Metadata map[string]string `json:"metadata"`
}

type Value struct {
	Name   string   `json:"name"`
	Type   string   `json:"type"`
	Values []*Value `json:"values"`
}

var sidecar string

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-micro client: "+format+"\n", args...)
	os.Exit(1)
}

func send(method, path, contentType string, body []byte) (int, []byte) {
	req, err := http.NewRequest(method, sidecar+path, bytes.NewReader(body))
	if err != nil {
		fail("%s %s: %v", method, path, err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	rsp, err := http.DefaultClient.Do(req)
	if err != nil {
		fail("%s %s: %v", method, path, err)
	}
	defer rsp.Body.Close()
	b, _ := io.ReadAll(rsp.Body)
	return rsp.StatusCode, b
}

// lookup reads a service back the way go-micro's clients decode micro's registry.
func lookup(name string) []*Service {
	code, body := send("GET", "/registry?service="+name, "", nil)
	if code != 200 {
		fail("GET /registry?service=%s: %d %s", name, code, body)
	}
	var services []*Service
	if err := json.Unmarshal(body, &services); err != nil {
		fail("decoding %s into []*registry.Service: %v", body, err)
	}
	return services
}

func node(services []*Service, id string) *Node {
	for _, s := range services {
		for _, n := range s.Nodes {
			if n.Id == id {
				return n
			}
		}
	}
	fail("node %s is not listed: %+v", id, services)
	return nil
}

// dial is what go-micro's client (client/rpc_client.go) and older clients that
// always join them do with a node: Address, then Port.
func dial(n *Node) string {
	return fmt.Sprintf("%s:%d", n.Address, n.Port)
}

func hostPort(s string) (string, int) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		fail("%q: %v", s, err)
	}
	p, _ := strconv.Atoi(port)
	return host, p
}

func main() {
	flag.StringVar(&sidecar, "sidecar", "http://127.0.0.1:8081", "the sidecar's API")
	nodeAddress := flag.String("node", "", "host:port of an HTTP server to register")
	app := flag.String("app", "", "the app the sidecar registered (--server-name)")
	appAddress := flag.String("app-address", "", "its --server-address")
	flag.Parse()
	host, port := hostPort(*nodeAddress)

	// A go-micro v0 node (nothing but an address) and a v1 one (the metadata
	// server/rpc_server.go sets in v1.0.0), with an endpoint as go-micro's
	// reflection describes one; every field left empty is marshalled as null.
	service := &Service{
		Name: "go.micro.srv.greeter",
		Endpoints: []*Endpoint{{
			Name:    "Say.Hello",
			Request: &Value{Name: "Request", Type: "Request"},
		}},
		Nodes: []*Node{
			{Id: "go.micro.srv.greeter-v0", Address: host, Port: port},
			{Id: "go.micro.srv.greeter-v1", Address: host, Port: port, Metadata: map[string]string{
				"transport": "http", "broker": "http", "server": "rpc",
				"registry": "consul", "protocol": "mucp",
			}},
		},
	}
	body, err := json.Marshal(service)
	if err != nil {
		fail("marshal: %v", err)
	}
	for _, null := range []string{`"metadata":null`, `"endpoints":[{"name":"Say.Hello","request":{"name":"Request","type":"Request","values":null},"response":null,"metadata":null}]`} {
		if !strings.Contains(string(body), null) {
			fail("json.Marshal no longer sends %s: %s", null, body)
		}
	}
	if code, rsp := send("POST", "/registry", "application/json", body); code != 200 {
		fail("POST /registry %s: %d %s", body, code, rsp)
	}

	services := lookup(service.Name)
	for _, id := range []string{"go.micro.srv.greeter-v0", "go.micro.srv.greeter-v1"} {
		n := node(services, id)
		if n.Address != host || n.Port != port {
			fail("%s is listed at Address %q Port %d; it was registered at %q %d", id, n.Address, n.Port, host, port)
		}
	}
	if p := node(services, "go.micro.srv.greeter-v1").Metadata["protocol"]; p != "mucp" {
		fail("the v1 node's protocol is %q, not mucp", p)
	}
	if e := services[0].Endpoints; len(e) != 1 || e[0].Name != "Say.Hello" || e[0].Request.Name != "Request" {
		fail("endpoints came back as %+v", e)
	}

	// The app the sidecar registered: host and port apart, as micro's sidecar did.
	if *app != "" {
		n := lookup(*app)[0].Nodes[0]
		if dial(n) != *appAddress {
			fail("%s is listed at Address %q Port %d: a client would dial %s, not %s", *app, n.Address, n.Port, dial(n), *appAddress)
		}
	}

	// A call by name reaches the node registered with host and port apart (the v0
	// one: the v1 node speaks go-micro's RPC, which go_micro.rs tests with a real
	// JSON-RPC server); the method named the go-micro v1 way.
	call, _ := json.Marshal(map[string]interface{}{
		"service": service.Name, "endpoint": "Say.Hello", "request": map[string]string{"name": "John"},
		"address": "go.micro.srv.greeter-v0",
	})
	if code, rsp := send("POST", "/rpc", "application/json", call); code != 200 {
		fail("POST /rpc %s: %d %s", call, code, rsp)
	}

	if code, rsp := send("DELETE", "/registry", "application/json", body); code != 200 {
		fail("DELETE /registry %s: %d %s", body, code, rsp)
	}
	if code, rsp := send("GET", "/registry?service="+service.Name, "", nil); code != 404 {
		fail("after DELETE /registry, GET answers %d %s", code, rsp)
	}
	fmt.Println("ok")
}
