// go-micro's broker.Message (broker/broker.go of go-micro v1.18.0) through Go's own
// encoding/json, as go-micro's NATS broker marshals it with its default JSON codec
// (broker/nats/nats.go: n.opts.Codec.Marshal(msg)). Standard library only.
//
//	broker_message encode HEADER_JSON BODY   prints the message's JSON
//	broker_message decode JSON               prints {"Header": ..., "Body": "<text>"}
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

type Message struct {
	Header map[string]string
	Body   []byte
}

func main() {
	switch os.Args[1] {
	case "encode":
		var header map[string]string
		if err := json.Unmarshal([]byte(os.Args[2]), &header); err != nil {
			panic(err)
		}
		b, err := json.Marshal(&Message{Header: header, Body: []byte(os.Args[3])})
		if err != nil {
			panic(err)
		}
		fmt.Println(string(b))
	case "decode":
		var m Message
		if err := json.Unmarshal([]byte(os.Args[2]), &m); err != nil {
			fmt.Fprintln(os.Stderr, "decode:", err)
			os.Exit(1)
		}
		b, _ := json.Marshal(map[string]interface{}{"Header": m.Header, "Body": string(m.Body)})
		fmt.Println(string(b))
	}
}
