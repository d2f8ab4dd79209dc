#!/usr/bin/env node
// Call an embedrpc server from Node.js. The stubs are built at run time from
// protos/embedrpc/v1/embedder.proto with @grpc/proto-loader: nothing is generated
// or committed, so this client follows the proto as it is.
//
//   npm ci --prefix examples/node
//   node examples/node/embed.js --target localhost:50051 --prompt-name query "What is gRPC?"
//
// Prints one JSON object: {model, dimensions, embeddings: [[...]], usage}.
// --target takes anything gRPC does: host:port, a headless Service as
// dns:///embedrpc-headless.default.svc.cluster.local:50051, or a static list
// ipv4:10.0.0.1:50051,10.0.0.2:50051. The channel balances round_robin over every
// address and retries UNAVAILABLE (Embed is idempotent), like the Python client.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.EMBEDRPC_PROTO_DIR || path.join(__dirname, '..', '..', 'protos');

const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [{
    name: [{ service: 'embedrpc.v1.Embedder', method: 'Embed' },
           { service: 'embedrpc.v1.Embedder', method: 'Info' }],
    retryPolicy: {
      maxAttempts: 5,
      initialBackoff: '0.1s',
      maxBackoff: '2s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'],
    },
  }],
};

function loadEmbedder(protoDir = PROTO_DIR) {
  const definition = protoLoader.loadSync('embedrpc/v1/embedder.proto', {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the proto: prompt_name, request_id, ...
    enums: String, // ENCODING_FLOAT32_BYTES rather than 1
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).embedrpc.v1.Embedder;
}

function connect(target, { credentials = grpc.credentials.createInsecure() } = {}) {
  const Embedder = loadEmbedder();
  return new Embedder(target, credentials, {
    'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
    'grpc.max_receive_message_length': 256 * 1024 * 1024,
  });
}

function call(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, reply) =>
      (err ? reject(err) : resolve(reply)));
  });
}

// EmbedResponse → array of rows. ENCODING_FLOAT32_BYTES: `data` holds count x dimensions
// little-endian float32, row-major (read value by value: a Buffer need not be aligned).
function decode(response) {
  const d = response.dimensions;
  if (response.encoding === 'ENCODING_FLOAT') {
    return response.embeddings.map((e) => e.values);
  }
  if (response.encoding !== 'ENCODING_FLOAT32_BYTES') {
    throw new Error(`decode: encoding ${response.encoding} is not handled by this example`);
  }
  const rows = [];
  for (let r = 0; r < response.count; r += 1) {
    const row = new Array(d);
    for (let c = 0; c < d; c += 1) row[c] = response.data.readFloatLE((r * d + c) * 4);
    rows.push(row);
  }
  return rows;
}

async function embed(client, inputs, { promptName = '', dimensions = 0, timeoutMs = 30000 } = {}) {
  const response = await call(client, 'Embed', {
    inputs,
    prompt_name: promptName,
    dimensions,
    encoding: 'ENCODING_FLOAT32_BYTES', // compact; ENCODING_FLOAT gives embeddings[i].values
  }, timeoutMs);
  return { dimensions: response.dimensions, embeddings: decode(response),
           usage: response.usage };
}

function parseArgs(argv) {
  const opts = { target: 'localhost:50051', promptName: '', dimensions: 0, timeoutMs: 30000,
                 texts: [] };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      i += 1;
      return argv[i];
    };
    if (arg === '--target') opts.target = value();
    else if (arg === '--prompt-name') opts.promptName = value();
    else if (arg === '--dimensions') opts.dimensions = Number.parseInt(value(), 10);
    else if (arg === '--timeout') opts.timeoutMs = Number.parseFloat(value()) * 1000;
    else if (arg.startsWith('--')) throw new Error(`unknown option ${arg}`);
    else opts.texts.push(arg);
  }
  if (opts.texts.length === 0) throw new Error('give at least one text to embed');
  return opts;
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`embed.js: ${err.message}\nusage: node embed.js [--target HOST:PORT] `
      + '[--prompt-name NAME] [--dimensions N] [--timeout SECONDS] TEXT...\n');
    return 2;
  }
  const client = connect(opts.target);
  try {
    const info = await call(client, 'Info', {}, opts.timeoutMs);
    const result = await embed(client, opts.texts, opts);
    process.stdout.write(`${JSON.stringify({ model: info.model, ...result })}\n`);
    return 0;
  } catch (err) {
    const code = err.code !== undefined ? grpc.status[err.code] : 'ERROR';
    process.stderr.write(`embed.js: ${code}: ${err.details || err.message}\n`);
    return 1;
  } finally {
    client.close();
  }
}

module.exports = { loadEmbedder, connect, embed, decode };

if (require.main === module) {
  main().then((code) => { process.exitCode = code; });
}
