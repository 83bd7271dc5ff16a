// go-micro's etcd registry, its keys and values: what registry/etcd/etcd.go of
// github.com/micro/go-micro v1.18.0 writes for a node (encode, nodePath; the same in
// v5) and how its GetService reads a service back (decode, grouped by version). The
// types and functions are copied from that source; the etcd client is left out (the
// test moves bytes with etcd's own etcdctl). Standard library only. Run by
// crates/pillion/tests/go_micro.rs.
//
//	go run etcd_registry.go encode -name N -id ID -address HOST:PORT [-version V] [-meta k=v,k=v]
//	    prints the node's key, then its value, one per line
//	go run etcd_registry.go get -name N -from FILE
//	    FILE holds `etcdctl get --prefix /micro/registry/N/ -w json`; prints what
//	    GetService returns, as JSON
package main

import (
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
)

// registry/service.go, v1.18.0.

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

// registry/etcd/etcd.go, v1.18.0.

var prefix = "/micro/registry/"

func encode(s *Service) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func decode(ds []byte) *Service {
	var s *Service
	json.Unmarshal(ds, &s)
	return s
}

func nodePath(s, id string) string {
	service := strings.Replace(s, "/", "-", -1)
	node := strings.Replace(id, "/", "-", -1)
	return path.Join(prefix, service, node)
}

// GetService's loop over the keys under servicePath(name)+"/".
func getService(values [][]byte) []*Service {
	serviceMap := map[string]*Service{}
	for _, v := range values {
		if sn := decode(v); sn != nil {
			s, ok := serviceMap[sn.Version]
			if !ok {
				s = &Service{
					Name:      sn.Name,
					Version:   sn.Version,
					Metadata:  sn.Metadata,
					Endpoints: sn.Endpoints,
				}
				serviceMap[s.Version] = s
			}
			s.Nodes = append(s.Nodes, sn.Nodes...)
		}
	}
	services := make([]*Service, 0, len(serviceMap))
	for _, service := range serviceMap {
		services = append(services, service)
	}
	sort.Slice(services, func(i, j int) bool { return services[i].Version < services[j].Version })
	return services
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "etcd_registry: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: etcd_registry encode|get ...")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	name := flags.String("name", "", "service name")
	id := flags.String("id", "", "node id")
	address := flags.String("address", "", "node address, host:port")
	version := flags.String("version", "", "service version")
	meta := flags.String("meta", "", "node metadata, k=v,k=v")
	from := flags.String("from", "", "etcdctl's JSON output")
	flags.Parse(os.Args[2:])

	switch os.Args[1] {
	case "encode":
		// As go-micro's rpc_server.go Register builds it: a node with go-micro's
		// metadata, the handler's endpoint described with its request and response.
		node := &Node{Id: *id, Address: *address, Metadata: map[string]string{}}
		for _, kv := range strings.Split(*meta, ",") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				node.Metadata[k] = v
			}
		}
		service := &Service{
			Name:    *name,
			Version: *version,
			Nodes:   []*Node{node},
			Endpoints: []*Endpoint{{
				Name: "Say.Hello",
				Request: &Value{Name: "Request", Type: "Request", Values: []*Value{
					{Name: "name", Type: "string"},
				}},
				Response: &Value{Name: "Response", Type: "Response", Values: []*Value{
					{Name: "msg", Type: "string"},
				}},
				Metadata: map[string]string{"stream": "false"},
			}},
		}
		fmt.Println(nodePath(service.Name, node.Id))
		fmt.Println(encode(service))
	case "get":
		raw, err := os.ReadFile(*from)
		if err != nil {
			fail("%v", err)
		}
		var rsp struct {
			Kvs []struct {
				Key   string `json:"key"`
				Value string `json:"value"`
				Lease int64  `json:"lease"`
			} `json:"kvs"`
		}
		if err := json.Unmarshal(raw, &rsp); err != nil {
			fail("etcdctl's output: %v", err)
		}
		var values [][]byte
		for _, kv := range rsp.Kvs {
			key, _ := base64.StdEncoding.DecodeString(kv.Key)
			if !strings.HasPrefix(string(key), path.Join(prefix, *name)+"/") {
				fail("key %q is not under service %q", key, *name)
			}
			v, err := base64.StdEncoding.DecodeString(kv.Value)
			if err != nil {
				fail("value of %q: %v", key, err)
			}
			values = append(values, v)
		}
		out, _ := json.Marshal(getService(values))
		fmt.Println(string(out))
	default:
		fail("unknown command %q", os.Args[1])
	}
}
