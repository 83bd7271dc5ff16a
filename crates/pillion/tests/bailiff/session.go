// bailiff's session values as bailiff writes and reads them: gorilla/sessions'
// redisstore gob-encodes session.Values, a map[interface{}]interface{} whose keys are
// the header names after X-Session-Set- (strings) and whose values are []string; a
// new id is the unpadded standard base32 of 64 random bytes. Go standard library only.
//
//	session new        prints "ID HEX": a new id, and the gob of
//	                   {"User-Id": ["42"], "Roles": ["admin", "ops"]}
//	session read HEX   prints the session the gob holds, as JSON
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base32"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	switch os.Args[1] {
	case "new":
		raw := make([]byte, 64)
		if _, err := rand.Read(raw); err != nil {
			panic(err)
		}
		id := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(raw)
		values := map[interface{}]interface{}{
			"User-Id": []string{"42"},
			"Roles":   []string{"admin", "ops"},
		}
		var buf bytes.Buffer
		if err := gob.NewEncoder(&buf).Encode(values); err != nil {
			panic(err)
		}
		fmt.Println(id, hex.EncodeToString(buf.Bytes()))
	case "read":
		raw, err := hex.DecodeString(os.Args[2])
		if err != nil {
			panic(err)
		}
		values := map[interface{}]interface{}{}
		if err := gob.NewDecoder(bytes.NewReader(raw)).Decode(&values); err != nil {
			fmt.Fprintln(os.Stderr, "gob:", err)
			os.Exit(1)
		}
		out := map[string][]string{}
		for k, v := range values {
			out[k.(string)] = v.([]string)
		}
		b, _ := json.Marshal(out)
		fmt.Println(string(b))
	}
}
