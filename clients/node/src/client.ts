// A small metalake client for Node.js, on @grpc/grpc-js, loading the contract from protos/ at
// run time (no code generation step). It uploads with metadata and fill_metadata, lists with a
// filter, downloads and verifies the SHA-256, and decodes the server's error details.

import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, existsSync, promises as fs } from "node:fs";
import { basename, join } from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

const PROTOS = join(__dirname, "..", "..", "..", "..", "protos");
const RPC_PROTOS = join(__dirname, "..", "..", "protos");
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false, // absent fields stay absent: latitude 0 and "no latitude" differ
  oneofs: true,
  includeDirs: [PROTOS, RPC_PROTOS],
};
export const CHUNK_SIZE = 256 * 1024;

/** Metadata as the contract has it; acquired_at is a google.protobuf.Timestamp. */
export interface Metadata {
  latitude?: number;
  longitude?: number;
  altitude?: number;
  acquired_at?: { seconds: string; nanos?: number };
  acquired_at_utc_offset?: { seconds: string; nanos?: number };
  acquired_by?: string;
  weather?: string;
  resolution_x?: number;
  resolution_y?: number;
  resolution_unit?: string;
  compression?: string;
  manufacturer?: string;
  software?: string;
  color_space?: string;
  custom_id?: string;
  reference?: string;
}

export interface Data {
  id: string;
  filename: string;
  size: string;
  sha256: string;
  content_type: string;
  metadata?: Metadata;
  metadata_sources?: Record<string, string>;
  tags?: string[];
  etag?: string;
}

/** A refused call: the gRPC code, the server's message, and the fields at fault. */
export class MetalakeError extends Error {
  constructor(
    message: string,
    readonly code: grpc.status,
    readonly violations: { field: string; description: string }[],
  ) {
    super(message);
  }
}

const definitions = protoLoader.loadSync(
  ["metalake/v1/datalake.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"],
  LOADER_OPTIONS,
);
const loaded = grpc.loadPackageDefinition(definitions) as any;
// The error details are decoded with protobufjs (what proto-loader itself is built on).
const root = new protobuf.Root();
root.resolvePath = (_origin: string, target: string) =>
  [RPC_PROTOS, PROTOS].map((dir) => join(dir, target)).find((path) => existsSync(path)) ?? target;
root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = root.lookupType("google.rpc.Status");
const BadRequest = root.lookupType("google.rpc.BadRequest");

/** Turns a grpc-js error into a MetalakeError, decoding google.rpc.BadRequest details. */
export function toMetalakeError(error: grpc.ServiceError): MetalakeError {
  const violations: { field: string; description: string }[] = [];
  const [details] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (details instanceof Buffer) {
    const status = Status.decode(details) as any;
    for (const any of status.details ?? []) {
      if (any.type_url === "type.googleapis.com/google.rpc.BadRequest") {
        const bad = BadRequest.decode(any.value) as any;
        for (const v of bad.field_violations ?? []) {
          violations.push({ field: v.field, description: v.description });
        }
      }
    }
  }
  return new MetalakeError(error.details || error.message, error.code, violations);
}

export interface UploadOptions {
  metadata?: Metadata;
  fillMetadata?: boolean;
  tags?: string[];
}

export class MetalakeClient {
  private readonly stub: any;
  private readonly callMetadata: grpc.Metadata;

  constructor(target = process.env.METALAKE_TARGET ?? "127.0.0.1:50051", token = process.env.METALAKE_TOKEN) {
    this.stub = new loaded.metalake.v1.DatalakeService(target, grpc.credentials.createInsecure());
    this.callMetadata = new grpc.Metadata();
    if (token) this.callMetadata.set("authorization", `Bearer ${token}`);
  }

  close(): void {
    this.stub.close();
  }

  /** Streams a file from disk: the header first, then 256 KiB chunks. */
  uploadData(path: string, options: UploadOptions = {}): Promise<Data> {
    return new Promise((resolve, reject) => {
      const call = this.stub.UploadData(this.callMetadata, (error: grpc.ServiceError | null, response: any) =>
        error ? reject(toMetalakeError(error)) : resolve(response.data as Data),
      );
      call.write({
        header: {
          filename: basename(path),
          metadata: options.metadata ?? {},
          fill_metadata: options.fillMetadata ?? false,
          tags: options.tags ?? [],
        },
      });
      const file = createReadStream(path, { highWaterMark: CHUNK_SIZE });
      file.on("data", (chunk) => {
        // Respect flow control: pause reading while gRPC's buffer is full.
        if (!call.write({ chunk })) {
          file.pause();
          call.once("drain", () => file.resume());
        }
      });
      file.on("end", () => call.end());
      file.on("error", (error) => {
        call.cancel();
        reject(error);
      });
    });
  }

  /** Every item matching an AIP-160 filter, following page tokens. */
  async listData(filter = "", orderBy = ""): Promise<Data[]> {
    const all: Data[] = [];
    let page_token = "";
    do {
      const page: any = await new Promise((resolve, reject) =>
        this.stub.ListData(
          { filter, order_by: orderBy, page_size: 500, page_token },
          this.callMetadata,
          (error: grpc.ServiceError | null, response: any) =>
            error ? reject(toMetalakeError(error)) : resolve(response),
        ),
      );
      all.push(...((page.data ?? []) as Data[]));
      page_token = page.next_page_token ?? "";
    } while (page_token);
    return all;
  }

  /** Downloads to `path`, verifying size and SHA-256 against the item the server announces. */
  downloadData(id: string, path: string): Promise<Data> {
    return new Promise((resolve, reject) => {
      const call = this.stub.DownloadData({ id }, this.callMetadata);
      const partial = `${path}.part`;
      const out = createWriteStream(partial);
      const hash = createHash("sha256");
      let expected: Data | undefined;
      let size = 0;
      call.on("data", (message: any) => {
        if (message.data) {
          expected = message.data as Data;
          return;
        }
        hash.update(message.chunk);
        size += message.chunk.length;
        out.write(message.chunk);
      });
      call.on("error", (error: grpc.ServiceError) => {
        out.destroy();
        fs.rm(partial, { force: true }).finally(() => reject(toMetalakeError(error)));
      });
      call.on("end", () => {
        out.end(async () => {
          const digest = hash.digest("hex");
          if (!expected || String(size) !== String(expected.size) || digest !== expected.sha256) {
            await fs.rm(partial, { force: true });
            reject(new Error(`download of ${id} does not match: ${size} bytes, sha256 ${digest}`));
            return;
          }
          await fs.rename(partial, path);
          resolve(expected);
        });
      });
    });
  }
}

/** A Timestamp plus offset, as metalake keeps acquired_at, from an RFC 3339 string. */
export function acquiredAt(text: string): Pick<Metadata, "acquired_at" | "acquired_at_utc_offset"> {
  const match = /([+-])(\d\d):(\d\d)$|Z$/.exec(text);
  const instant = Math.floor(Date.parse(match ? text : `${text}Z`) / 1000);
  const result: Pick<Metadata, "acquired_at" | "acquired_at_utc_offset"> = {
    acquired_at: { seconds: String(instant) },
  };
  if (match) {
    const sign = match[1] === "-" ? -1 : 1;
    const offset = match[1] ? sign * (Number(match[2]) * 3600 + Number(match[3]) * 60) : 0;
    result.acquired_at_utc_offset = { seconds: String(offset) };
  }
  return result;
}
