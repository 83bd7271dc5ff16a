// A go-micro-era RPC server on the Go standard library only: net/rpc with the
// net/rpc/jsonrpc codec, served over HTTP as go-micro's HTTP transport carries it (one
// JSON-RPC request per POST body, the answer as the response body).
//
// usage: jsonrpc_server HOST:PORT
//
// Methods: Say.Hello ({"name"} -> {"msg"}), Say.NotFound (a go-micro error, as
// go-micro's errors.NotFound(...).Error() writes it), Say.Seen (the HTTP request the
// server saw before this one's: method, path, headers).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/rpc"
	"net/rpc/jsonrpc"
	"os"
	"sync"
)

type Request struct {
	Name string `json:"name"`
}

type Response struct {
	Msg string `json:"msg"`
}

type Seen struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Body    string            `json:"body"`
	Headers map[string]string `json:"headers"`
}

// go-micro's errors.Error.
type microError struct {
	Id     string `json:"id"`
	Code   int32  `json:"code"`
	Detail string `json:"detail"`
	Status string `json:"status"`
}

var (
	mu       sync.Mutex
	previous Seen
	last     Seen
)

type Say struct{}

func (s *Say) Hello(req *Request, rsp *Response) error {
	rsp.Msg = "Hello " + req.Name
	return nil
}

func (s *Say) NotFound(req *Request, rsp *Response) error {
	b, _ := json.Marshal(microError{Id: "go.micro.srv.greeter", Code: 404, Detail: "no user " + req.Name, Status: "Not Found"})
	return errors.New(string(b))
}

func (s *Say) Seen(req *Request, rsp *Seen) error {
	mu.Lock()
	defer mu.Unlock()
	*rsp = previous
	return nil
}

// One HTTP exchange as the connection net/rpc serves a request on.
type exchange struct {
	io.Reader
	io.Writer
}

func (exchange) Close() error { return nil }

func main() {
	if err := rpc.Register(new(Say)); err != nil {
		panic(err)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		panic(err)
	}
	http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		headers := map[string]string{}
		for k := range r.Header {
			headers[k] = r.Header.Get(k)
		}
		mu.Lock()
		previous = last
		last = Seen{Method: r.Method, Path: r.URL.Path, Body: string(body), Headers: headers}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		rpc.ServeRequest(jsonrpc.NewServerCodec(exchange{bytes.NewReader(body), w}))
	}))
}
