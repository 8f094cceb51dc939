'use strict';
/**
 * Node.js client of the neoserve public gRPC API (package neoserve.v1).
 *
 * The stubs are generated at run time from the repository's protos/ folder by @grpc/proto-loader, so this client
 * never drifts from the server's API and needs no code-generation step.
 *
 *   const { createClient, generate } = require('neoserve-client');
 *   const client = createClient('127.0.0.1:50051', { apiKey: process.env.NEOSERVE_API_KEY });
 *   for await (const chunk of generate(client, { prompt: 'Hello' }, { maxTokens: 32 })) process.stdout.write(chunk.text);
 */
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.NEOSERVE_PROTO_ROOT || path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'neoserve/v1/inference_service.proto';

let cached = null;

/** The neoserve.v1 package object (service constructors and message types). */
function loadApi() {
  if (cached === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [PROTO_ROOT],
      keepCase: true, // field names as in the .proto (max_tokens, token_ids)
      longs: Number,
      enums: String, // finish_reason as "FINISH_REASON_STOP"
      defaults: true,
      oneofs: true, // response.event names which of delta/complete is set
    });
    cached = grpc.loadPackageDefinition(definition).neoserve.v1;
  }
  return cached;
}

/**
 * A client of neoserve.v1.InferenceService.
 * options.apiKey: sent as "authorization: Bearer KEY"; options.tls: true or { rootCerts: Buffer }.
 */
function createClient(address, options = {}) {
  const api = loadApi();
  let creds = grpc.credentials.createInsecure();
  if (options.tls) {
    creds = grpc.credentials.createSsl(options.tls.rootCerts || null);
  }
  if (options.apiKey) {
    if (!options.tls) {
      // NOTE: grpc-js only attaches call credentials to secure channels, so send the key as plain metadata here.
      const client = new api.InferenceService(address, creds, channelOptions());
      client.neoserveMetadata = () => {
        const md = new grpc.Metadata();
        md.set('authorization', `Bearer ${options.apiKey}`);
        return md;
      };
      return client;
    }
    const callCreds = grpc.credentials.createFromMetadataGenerator((_params, cb) => {
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${options.apiKey}`);
      cb(null, md);
    });
    creds = grpc.credentials.combineChannelCredentials(creds, callCreds);
  }
  const client = new api.InferenceService(address, creds, channelOptions());
  client.neoserveMetadata = () => new grpc.Metadata();
  return client;
}

function channelOptions() {
  // Keepalive pings so long streams survive idle middleboxes (the server allows one every 5 s).
  return { 'grpc.keepalive_time_ms': 30000, 'grpc.keepalive_timeout_ms': 10000 };
}

/** Builds a GenerateRequest from { prompt } | { messages } | { promptTokenIds } and camelCase sampling options. */
function buildRequest(input, sampling = {}) {
  const request = { sampling: {} };
  if (input.prompt !== undefined) request.prompt = input.prompt;
  else if (input.messages !== undefined) request.chat = { messages: input.messages };
  else if (input.promptTokenIds !== undefined) request.prompt_token_ids = { ids: input.promptTokenIds };
  for (const [key, value] of Object.entries(sampling)) {
    if (value === undefined || value === null) continue;
    request.sampling[key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)] = value;
  }
  return request;
}

/**
 * Streams a reply: yields { text, tokenIds } per delta, then one { finishReason, usage, stopString }.
 * Leaving the loop early cancels the call, which aborts the request on the server and frees its KV cache.
 */
async function* generate(client, input, sampling = {}, { deadlineMs } = {}) {
  const callOptions = deadlineMs ? { deadline: new Date(Date.now() + deadlineMs) } : {};
  const call = client.Generate(buildRequest(input, sampling), client.neoserveMetadata(), callOptions);
  let done = false;
  try {
    for await (const response of call) {
      if (response.event === 'delta') {
        yield { text: response.delta.text, tokenIds: response.delta.token_ids };
      } else if (response.event === 'complete') {
        const c = response.complete;
        done = true;
        yield { text: '', tokenIds: [], finishReason: c.finish_reason, usage: c.usage, stopString: c.stop_string };
      }
    }
  } finally {
    if (!done) call.cancel();
  }
}

/** Promisified unary call. */
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, client.neoserveMetadata(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

module.exports = {
  createClient,
  generate,
  buildRequest,
  loadApi,
  modelInfo: (client) => unary(client, 'ModelInfo', {}),
  tokenize: (client, text) => unary(client, 'Tokenize', { text }),
  grpc,
};
