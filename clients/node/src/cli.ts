#!/usr/bin/env node
// The metalake Node.js client on the command line. The server comes from METALAKE_TARGET
// (default 127.0.0.1:50051), an API token from METALAKE_TOKEN.

import { MetalakeClient, MetalakeError, Metadata, acquiredAt, formatAcquiredAt, toJSON } from "./client";

const USAGE = `usage:
  metalake-node upload FILE... [--meta KEY=VALUE]... [--fill-metadata] [--tag TAG]...
                               [--content-type TYPE] [--request-id UUID]
  metalake-node ls [--filter EXPR] [--order-by FIELDS]
  metalake-node get ID
  metalake-node download ID -o PATH

--meta takes any Metadata field (latitude=43.6, reference=7NGOMI, ...); acquired_at takes
RFC 3339 (2021-04-11T15:47:53-05:00, or without an offset when it is unknown).
Items print as JSON, one a line. Exit status: 0 done, 1 refused or unverified, 2 usage.`;

const NUMBERS = new Set(["latitude", "longitude", "altitude", "resolution_x", "resolution_y"]);
const WITH_VALUE = new Set(["--meta", "--tag", "--filter", "--order-by", "-o", "--output", "--content-type", "--request-id"]);
const FLAGS = new Set(["--fill-metadata", "-h", "--help"]);

class UsageError extends Error {}

interface Args {
  positional: string[];
  options: Map<string, string[]>;
  flags: Set<string>;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { positional: [], options: new Map(), flags: new Set() };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value: string | undefined;
    if (arg.startsWith("--") && arg.includes("=")) {
      value = arg.slice(arg.indexOf("=") + 1);
      arg = arg.slice(0, arg.indexOf("="));
    }
    if (FLAGS.has(arg) && value === undefined) {
      args.flags.add(arg);
    } else if (WITH_VALUE.has(arg)) {
      if (value === undefined) {
        if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
        value = argv[++i];
      }
      const name = arg === "--output" ? "-o" : arg;
      args.options.set(name, [...(args.options.get(name) ?? []), value]);
    } else if (arg.startsWith("-") && arg !== "-") {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      args.positional.push(arg);
    }
  }
  return args;
}

function parseMeta(pairs: string[]): Metadata {
  const metadata: Record<string, unknown> = {};
  for (const pair of pairs) {
    const at = pair.indexOf("=");
    if (at < 1) throw new UsageError(`--meta ${pair}: expected KEY=VALUE`);
    const key = pair.slice(0, at);
    const value = pair.slice(at + 1);
    if (key === "acquired_at") Object.assign(metadata, acquiredAt(value));
    else metadata[key] = NUMBERS.has(key) ? Number(value) : value; // the server checks ranges
  }
  return metadata as Metadata;
}

function print(data: Parameters<typeof toJSON>[0]): void {
  const json = toJSON(data) as any;
  const acquired = formatAcquiredAt(data.metadata);
  if (acquired) json.metadata.acquired_at_text = acquired; // readable beside the Timestamp
  console.log(JSON.stringify(json));
}

async function run(client: MetalakeClient, command: string | undefined, args: Args): Promise<void> {
  const one = (name: string) => args.options.get(name)?.at(-1);
  const [first, ...extra] = args.positional;
  if (command === "upload") {
    if (!args.positional.length) throw new UsageError("upload needs a FILE");
    const metadata = parseMeta(args.options.get("--meta") ?? []);
    for (const file of args.positional) {
      print(
        await client.uploadData(file, {
          metadata,
          fillMetadata: args.flags.has("--fill-metadata"),
          tags: args.options.get("--tag") ?? [],
          contentType: one("--content-type"),
          requestId: one("--request-id"),
        }),
      );
    }
  } else if (command === "ls") {
    if (args.positional.length) throw new UsageError(`ls takes no ${args.positional[0]}`);
    for await (const data of client.iterData(one("--filter") ?? "", one("--order-by") ?? "")) print(data);
  } else if (command === "get") {
    if (!first || extra.length) throw new UsageError("get needs one ID");
    print(await client.getData(first));
  } else if (command === "download") {
    const output = one("-o");
    if (!first || extra.length || !output) throw new UsageError("download needs one ID and -o PATH");
    const data = await client.downloadData(first, output);
    console.log(`${data.id} -> ${output}: ${data.size} bytes, sha256 ${data.sha256} verified`);
  } else {
    throw new UsageError(command ? `unknown command ${command}` : "no command");
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  let args: Args;
  try {
    args = parseArgs(rest);
  } catch (error) {
    console.error(`${(error as Error).message}\n${USAGE}`);
    return 2;
  }
  if (command === "help" || args.flags.has("-h") || args.flags.has("--help")) {
    console.log(USAGE);
    return 0;
  }
  const client = new MetalakeClient();
  try {
    await run(client, command, args);
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      console.error(`${error.message}\n${USAGE}`);
      return 2;
    }
    if (error instanceof MetalakeError) {
      console.error(`error: ${error.codeName}: ${error.message}`);
      for (const v of error.violations) console.error(`  ${v.field}: ${v.description}`);
      if (error.retryDelayMs !== undefined) console.error(`  retry after ${error.retryDelayMs} ms`);
      if (error.requestId) console.error(`  request id ${error.requestId}`);
      return 1;
    }
    console.error(`error: ${(error as Error).message}`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
