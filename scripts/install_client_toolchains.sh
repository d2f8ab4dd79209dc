#!/bin/sh
# Toolchains for the Go and Java client tests (tests/test_go_client.py,
# tests/test_java_client.py), from Debian 12's packages: the Go module proxy and Maven
# Central are not reachable where embedrpc is built, Debian's mirror is. Without them
# those two tests skip. Needs root (or sudo) and apt-get.
set -eu
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    protobuf-compiler \
    golang-go golang-google-grpc-dev golang-google-protobuf-dev \
    golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc \
    default-jdk-headless protobuf-compiler-grpc-java-plugin libgrpc-java libnetty-java \
    libguava-java libgoogle-gson-java libperfmark-java libgeronimo-annotation-1.3-spec-java \
    > /dev/null
