// Command embed calls an embedrpc server from Go and prints the vectors as JSON.
//
// Stubs: generate them from protos/ (the proto's go_package is
// github.com/embedrpc/embedrpc/gen/go/embedrpc/v1), e.g.
//
//	protoc -I protos --go_out=gen --go_opt=paths=source_relative \
//	    --go-grpc_out=gen --go-grpc_opt=paths=source_relative protos/embedrpc/v1/embedder.proto
//
// and map the import path to that folder (a replace directive in go.mod), or use
// buf generate. tests/test_go_client.py builds this file with Debian 12's Go packages
// (grpc-go 1.33) in GOPATH mode and runs it against a server.
//
//	go run . -target localhost:50051 -prompt-name query "What is gRPC?"
//
// -target takes what gRPC does: host:port, dns:///embedrpc-headless.default.svc.cluster.local:50051
// (a headless Service: round_robin over every pod), ...
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	embedrpcv1 "github.com/embedrpc/embedrpc/gen/go/embedrpc/v1"
	"google.golang.org/grpc"
)

// round_robin over every address the target resolves to; UNAVAILABLE retried (Embed is
// idempotent). grpc-go before 1.40 applies retryPolicy only with GRPC_GO_RETRY=on.
const serviceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [{"service": "embedrpc.v1.Embedder", "method": "Embed"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
  }]
}`

// decode turns ENCODING_FLOAT32_BYTES data (row-major little-endian float32) into rows.
func decode(r *embedrpcv1.EmbedResponse) [][]float32 {
	d := int(r.GetDimensions())
	rows := make([][]float32, r.GetCount())
	for i := range rows {
		rows[i] = make([]float32, d)
		for j := 0; j < d; j++ {
			bits := binary.LittleEndian.Uint32(r.GetData()[(i*d+j)*4:])
			rows[i][j] = math.Float32frombits(bits)
		}
	}
	return rows
}

func main() {
	target := flag.String("target", "localhost:50051", "server address")
	promptName := flag.String("prompt-name", "", "a named prompt of the model, e.g. query")
	dimensions := flag.Uint("dimensions", 0, "Matryoshka size (0: full)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: embed [-target HOST:PORT] [-prompt-name NAME] [-dimensions N] TEXT...")
		os.Exit(2)
	}

	// grpc.Dial and WithInsecure keep this compiling with old grpc-go (1.33, Debian 12);
	// with grpc-go 1.63 or newer prefer grpc.NewClient(*target,
	// grpc.WithTransportCredentials(insecure.NewCredentials()), ...).
	conn, err := grpc.Dial(*target, grpc.WithInsecure(), grpc.WithDefaultServiceConfig(serviceConfig))
	if err != nil {
		fmt.Fprintln(os.Stderr, "embed:", err)
		os.Exit(1)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	response, err := embedrpcv1.NewEmbedderClient(conn).Embed(ctx, &embedrpcv1.EmbedRequest{
		Inputs:     flag.Args(),
		PromptName: *promptName,
		Dimensions: uint32(*dimensions),
		Encoding:   embedrpcv1.Encoding_ENCODING_FLOAT32_BYTES,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "embed:", err) // e.g. rpc error: code = InvalidArgument desc = ...
		os.Exit(1)
	}
	out, _ := json.Marshal(map[string]any{
		"dimensions": response.GetDimensions(),
		"embeddings": decode(response),
		"usage":      map[string]uint32{"prompt_tokens": response.GetUsage().GetPromptTokens()},
	})
	fmt.Println(string(out))
}
