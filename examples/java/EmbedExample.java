// Call an embedrpc server from Java with grpc-java. Stubs: generate them from
// protos/ with protoc and the grpc-java plugin (README, "Clients" → Java), e.g. in Maven
// with protobuf-maven-plugin, or as tests/test_java_client.py does:
//   protoc -I protos --java_out=gen --grpc-java_out=gen protos/embedrpc/v1/embedder.proto
//
//   java EmbedExample [TARGET] TEXT...
// TARGET: host:port, dns:///embedrpc-headless.default.svc.cluster.local:50051, ...
// Prints the dimensions, then one line per vector: its first values and its L2 norm.

import io.embedrpc.v1.EmbedRequest;
import io.embedrpc.v1.EmbedResponse;
import io.embedrpc.v1.EmbedderGrpc;
import io.embedrpc.v1.Encoding;
import io.embedrpc.v1.Embedding;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

public final class EmbedExample {
  // round_robin over every address the target resolves to; UNAVAILABLE retried (Embed is
  // idempotent). Numbers are Doubles, as grpc-java's service config parser expects.
  private static final Map<String, Object> SERVICE_CONFIG = Map.of(
      "loadBalancingConfig", List.of(Map.of("round_robin", Map.of())),
      "methodConfig", List.of(Map.of(
          "name", List.of(Map.of("service", "embedrpc.v1.Embedder", "method", "Embed")),
          "retryPolicy", Map.of(
              "maxAttempts", 5.0,
              "initialBackoff", "0.1s",
              "maxBackoff", "2s",
              "backoffMultiplier", 2.0,
              "retryableStatusCodes", List.of("UNAVAILABLE")))));

  public static void main(String[] args) throws InterruptedException {
    if (args.length < 2) {
      System.err.println("usage: java EmbedExample TARGET TEXT...");
      System.exit(2);
    }
    ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0])
        .usePlaintext()
        .defaultServiceConfig(SERVICE_CONFIG)
        .enableRetry()
        .maxInboundMessageSize(256 << 20)
        .build();
    try {
      EmbedderGrpc.EmbedderBlockingStub stub = EmbedderGrpc.newBlockingStub(channel);
      EmbedRequest request = EmbedRequest.newBuilder()
          .addAllInputs(Arrays.asList(args).subList(1, args.length))
          .setPromptName("query")
          .setDimensions(32)
          .setEncoding(Encoding.ENCODING_FLOAT)  // vectors in embeddings[i].values
          .build();
      EmbedResponse response = stub.withDeadlineAfter(30, TimeUnit.SECONDS).embed(request);
      System.out.println("dimensions " + response.getDimensions());
      for (Embedding e : response.getEmbeddingsList()) {
        double norm = 0;
        StringBuilder line = new StringBuilder();
        for (int i = 0; i < e.getValuesCount(); i++) {
          norm += e.getValues(i) * e.getValues(i);
          line.append(i == 0 ? "" : " ").append(e.getValues(i));
        }
        System.out.println(line + " norm " + Math.sqrt(norm));
      }
    } catch (StatusRuntimeException e) {
      System.err.println("EmbedExample: " + e.getStatus());
      System.exit(1);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
