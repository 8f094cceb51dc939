#!/usr/bin/env node
'use strict';
/**
 * Streams one reply from a neoserve server to stdout.
 *
 *   node examples/stream.js [--address 127.0.0.1:50051] [--chat] [--max-tokens 64] [--temperature 0] "Hello"
 *
 * Prints the text as it arrives, then a summary line on stderr. Exits 1 with the gRPC status on error.
 */
const { createClient, generate, grpc } = require('..');

function parseArgs(argv) {
  const args = { address: process.env.NEOSERVE_ADDRESS || '127.0.0.1:50051', chat: false, maxTokens: 64,
                 temperature: undefined, text: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--address') args.address = argv[++i];
    else if (a === '--chat') args.chat = true;
    else if (a === '--max-tokens') args.maxTokens = Number(argv[++i]);
    else if (a === '--temperature') args.temperature = Number(argv[++i]);
    else args.text = a;
  }
  if (args.text === null) {
    console.error('usage: stream.js [--address HOST:PORT] [--chat] [--max-tokens N] [--temperature T] TEXT');
    process.exit(2);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = createClient(args.address, { apiKey: process.env.NEOSERVE_API_KEY });
  const input = args.chat ? { messages: [{ role: 'user', content: args.text }] } : { prompt: args.text };
  try {
    for await (const chunk of generate(client, input, { maxTokens: args.maxTokens, temperature: args.temperature })) {
      if (chunk.finishReason) {
        const u = chunk.usage;
        console.error(`\n[${chunk.finishReason}; ${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens]`);
      } else {
        process.stdout.write(chunk.text);
      }
    }
  } catch (err) {
    const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
    console.error(`\nneoserve: ${code}: ${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
