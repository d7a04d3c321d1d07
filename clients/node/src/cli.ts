#!/usr/bin/env node
// metalake-node upload FILE [--meta key=value ...] [--fill-metadata] [--tag T]
// metalake-node ls [--filter EXPR]
// metalake-node download ID -o PATH
// The server comes from METALAKE_TARGET (default 127.0.0.1:50051), a token from METALAKE_TOKEN.

import { MetalakeClient, MetalakeError, Metadata, acquiredAt } from "./client";

const NUMBERS = new Set(["latitude", "longitude", "altitude", "resolution_x", "resolution_y"]);

function parseMeta(pairs: string[]): Metadata {
  const metadata: Record<string, unknown> = {};
  for (const pair of pairs) {
    const at = pair.indexOf("=");
    if (at < 1) throw new Error(`--meta ${pair}: expected key=value`);
    const key = pair.slice(0, at);
    const value = pair.slice(at + 1);
    if (key === "acquired_at") Object.assign(metadata, acquiredAt(value));
    else metadata[key] = NUMBERS.has(key) ? Number(value) : value;
  }
  return metadata as Metadata;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  const option = (name: string): string[] =>
    rest.flatMap((arg, i) => (arg === name && i + 1 < rest.length ? [rest[i + 1]] : []));
  const client = new MetalakeClient();
  try {
    if (command === "upload") {
      const files = rest.filter((arg, i) => !arg.startsWith("--") && !rest[i - 1]?.match(/^--(meta|tag)$/));
      for (const file of files) {
        const data = await client.uploadData(file, {
          metadata: parseMeta(option("--meta")),
          fillMetadata: rest.includes("--fill-metadata"),
          tags: option("--tag"),
        });
        console.log(JSON.stringify(data));
      }
    } else if (command === "ls") {
      for (const data of await client.listData(option("--filter")[0] ?? "")) {
        console.log(JSON.stringify(data));
      }
    } else if (command === "download") {
      const data = await client.downloadData(rest[0], option("-o")[0]);
      console.log(`${data.id} -> ${option("-o")[0]} (sha256 verified)`);
    } else {
      console.error("usage: metalake-node upload|ls|download ...");
      return 2;
    }
    return 0;
  } catch (error) {
    if (error instanceof MetalakeError) {
      const fields = error.violations.map((v) => `${v.field}: ${v.description}`).join("; ");
      console.error(`error ${error.code}: ${error.message}${fields ? ` (${fields})` : ""}`);
      return 1;
    }
    throw error;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => process.exit(code));
