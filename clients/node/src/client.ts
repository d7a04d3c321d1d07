// A small metalake client for Node.js, on @grpc/grpc-js, loading the contract from protos/ at
// run time (no code generation step). It uploads with metadata and fill_metadata, lists with a
// filter, downloads and verifies the SHA-256, and decodes the server's error details.

import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, existsSync, promises as fs } from "node:fs";
import { basename, join } from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

// The repository's protos/ (this file runs from clients/node/dist/); METALAKE_PROTO_DIR overrides
// it for a copy of this client that lives elsewhere.
const PROTOS = process.env.METALAKE_PROTO_DIR ?? join(__dirname, "..", "..", "..", "protos");
// The two google.rpc messages the error details need (a subset of googleapis).
const RPC_PROTOS = join(__dirname, "..", "protos");
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true, // field names as in the .proto: fill_metadata, acquired_at
  longs: String, // int64 (size, Timestamp.seconds) as decimal strings: no precision lost
  enums: String,
  defaults: false, // absent fields stay absent: latitude 0 and "no latitude" differ
  oneofs: true, // a oneof's name says which member is set: message.content === "chunk"
  includeDirs: [PROTOS],
};
/** Bytes per upload message: the file is read from disk in pieces of this size. */
export const CHUNK_SIZE = 256 * 1024;

/** A google.protobuf.Timestamp or Duration as proto-loader gives it (seconds as a string). */
export interface Seconds {
  seconds: string;
  nanos?: number;
}

/** Metadata as the contract has it: every field optional, absent meaning "not known". */
export interface Metadata {
  latitude?: number;
  longitude?: number;
  altitude?: number;
  acquired_at?: Seconds;
  acquired_at_utc_offset?: Seconds;
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

/** One stored item (metalake.v1.Data). */
export interface Data {
  id: string;
  filename: string;
  size: string;
  sha256: string;
  content_type: string;
  metadata?: Metadata;
  metadata_sources?: Record<string, string>;
  tags?: string[];
  created_at?: Seconds;
  updated_at?: Seconds;
  etag?: string;
}

/** One field at fault, from google.rpc.BadRequest. */
export interface FieldViolation {
  field: string;
  description: string;
}

/**
 * A refused call: the gRPC code, the server's message, the fields at fault (google.rpc.BadRequest),
 * the delay to wait before retrying when the refusal is temporary (google.rpc.RetryInfo), and the
 * request id to quote when reporting a problem.
 */
export class MetalakeError extends Error {
  constructor(
    message: string,
    readonly code: grpc.status,
    readonly violations: FieldViolation[] = [],
    readonly retryDelayMs?: number,
    readonly requestId?: string,
  ) {
    super(message);
    this.name = "MetalakeError";
  }

  /** The code's name, e.g. "INVALID_ARGUMENT". */
  get codeName(): string {
    return grpc.status[this.code] ?? String(this.code);
  }
}

const definitions = protoLoader.loadSync("metalake/v1/datalake.proto", LOADER_OPTIONS);
const loaded = grpc.loadPackageDefinition(definitions) as any;
// The error details are decoded with protobufjs (what proto-loader itself is built on); its
// google/protobuf/*.proto types are built in.
const root = new protobuf.Root();
root.resolvePath = (_origin: string, target: string) =>
  [RPC_PROTOS, PROTOS].map((dir) => join(dir, target)).find((path) => existsSync(path)) ?? target;
root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = root.lookupType("google.rpc.Status");
const BadRequest = root.lookupType("google.rpc.BadRequest");
const RetryInfo = root.lookupType("google.rpc.RetryInfo");

/**
 * Turns a grpc-js error into a MetalakeError. The server puts a google.rpc.Status, serialized, in
 * the `grpc-status-details-bin` trailer; its details are Anys holding a BadRequest (the fields
 * at fault) and, for a temporary RESOURCE_EXHAUSTED, a RetryInfo.
 */
export function toMetalakeError(error: grpc.ServiceError): MetalakeError {
  const violations: FieldViolation[] = [];
  let retryDelayMs: number | undefined;
  const [details] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (details instanceof Buffer) {
    const status = Status.decode(details) as any;
    for (const any of status.details ?? []) {
      if (any.type_url === "type.googleapis.com/google.rpc.BadRequest") {
        const bad = BadRequest.decode(any.value) as any;
        for (const v of bad.field_violations ?? []) {
          violations.push({ field: v.field, description: v.description });
        }
      } else if (any.type_url === "type.googleapis.com/google.rpc.RetryInfo") {
        const delay = (RetryInfo.decode(any.value) as any).retry_delay;
        retryDelayMs = Number(delay?.seconds ?? 0) * 1000 + Math.round((delay?.nanos ?? 0) / 1e6);
      }
    }
  }
  const [requestId] = error.metadata?.get("x-request-id") ?? [];
  return new MetalakeError(
    error.details || error.message,
    error.code,
    violations,
    retryDelayMs,
    requestId === undefined ? undefined : String(requestId),
  );
}

export interface UploadOptions {
  /** Metadata the client knows; it always wins over extracted values. */
  metadata?: Metadata;
  /** Let the server fill the fields not given from the file itself (EXIF, GPS, plugins). */
  fillMetadata?: boolean;
  tags?: string[];
  /** The name stored with the item; default: the file's base name. */
  filename?: string;
  /** MIME type; default: the server detects it. */
  contentType?: string;
  /** A UUID reused on every retry of this file makes the upload idempotent (AIP-155). */
  requestId?: string;
  /** The server rejects the upload with DATA_LOSS unless the content hashes to this. */
  expectedSha256?: string;
}

export interface ClientOptions {
  /** host:port; default METALAKE_TARGET, else 127.0.0.1:50051. */
  target?: string;
  /** An API token sent as `authorization: Bearer`; default METALAKE_TOKEN. */
  token?: string;
  /** Channel credentials; default insecure (plaintext). */
  credentials?: grpc.ChannelCredentials;
}

export class MetalakeClient {
  private readonly stub: any;
  private readonly callMetadata: grpc.Metadata;

  constructor(options: ClientOptions | string = {}) {
    const { target, token, credentials } = typeof options === "string" ? { target: options } : options;
    this.stub = new loaded.metalake.v1.DatalakeService(
      target ?? process.env.METALAKE_TARGET ?? "127.0.0.1:50051",
      credentials ?? grpc.credentials.createInsecure(),
    );
    this.callMetadata = new grpc.Metadata();
    const bearer = token ?? process.env.METALAKE_TOKEN;
    if (bearer) this.callMetadata.set("authorization", `Bearer ${bearer}`);
  }

  close(): void {
    this.stub.close();
  }

  /**
   * Streams a file from disk: a header first, then chunks of CHUNK_SIZE bytes, read under gRPC
   * flow control (the file is never in memory whole). Resolves to the stored item.
   */
  uploadData(path: string, options: UploadOptions = {}): Promise<Data> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const file = createReadStream(path, { highWaterMark: CHUNK_SIZE });
      const call = this.stub.UploadData(this.callMetadata, (error: grpc.ServiceError | null, response: any) => {
        // The server may answer before the whole file is sent (a bad header): stop reading.
        file.destroy();
        if (settled) return;
        settled = true;
        if (error) reject(toMetalakeError(error));
        else resolve(response.data as Data);
      });
      call.write({
        header: {
          filename: options.filename ?? basename(path),
          metadata: options.metadata ?? {},
          fill_metadata: options.fillMetadata ?? false,
          tags: options.tags ?? [],
          content_type: options.contentType ?? "",
          request_id: options.requestId ?? "",
          expected_sha256: options.expectedSha256 ?? "",
        },
      });
      file.on("data", (chunk) => {
        if (settled) return;
        // Flow control: stop reading while gRPC's send buffer is full.
        if (!call.write({ chunk })) {
          file.pause();
          call.once("drain", () => file.resume());
        }
      });
      file.on("end", () => settled || call.end());
      file.on("error", (error) => {
        if (settled) return;
        settled = true;
        call.cancel(); // the server stores nothing of a cancelled upload
        reject(error);
      });
    });
  }

  /** One item by id. */
  getData(id: string): Promise<Data> {
    return new Promise((resolve, reject) =>
      this.stub.GetData({ id }, this.callMetadata, (error: grpc.ServiceError | null, response: any) =>
        error ? reject(toMetalakeError(error)) : resolve(response.data as Data),
      ),
    );
  }

  /** Every item matching an AIP-160 filter, page after page (pass each next_page_token back). */
  async *iterData(filter = "", orderBy = "", pageSize = 500): AsyncGenerator<Data> {
    let page_token = "";
    do {
      const page: any = await new Promise((resolve, reject) =>
        this.stub.ListData(
          { filter, order_by: orderBy, page_size: pageSize, page_token },
          this.callMetadata,
          (error: grpc.ServiceError | null, response: any) =>
            error ? reject(toMetalakeError(error)) : resolve(response),
        ),
      );
      yield* (page.data ?? []) as Data[];
      page_token = page.next_page_token ?? ""; // empty: that was the last page
    } while (page_token);
  }

  /** Every item matching an AIP-160 filter, as an array. */
  async listData(filter = "", orderBy = "", pageSize = 500): Promise<Data[]> {
    const all: Data[] = [];
    for await (const data of this.iterData(filter, orderBy, pageSize)) all.push(data);
    return all;
  }

  /**
   * Downloads to `path`, verifying size and SHA-256 against the Data the stream's first message
   * announces. The bytes go to `path.part` and are renamed into place only once verified.
   */
  downloadData(id: string, path: string): Promise<Data> {
    return new Promise((resolve, reject) => {
      const call = this.stub.DownloadData({ id }, this.callMetadata);
      const partial = `${path}.part`;
      const out = createWriteStream(partial);
      const hash = createHash("sha256");
      let expected: Data | undefined;
      let size = 0;
      let failed = false;
      const fail = (error: Error) => {
        if (failed) return;
        failed = true;
        call.cancel();
        out.destroy();
        fs.rm(partial, { force: true }).finally(() => reject(error));
      };
      call.on("data", (message: any) => {
        if (message.content === "data") {
          if (expected) return fail(new Error(`download of ${id}: the item was sent twice`));
          expected = message.data as Data;
          return;
        }
        if (!expected) return fail(new Error(`download of ${id}: bytes came before the item`));
        hash.update(message.chunk);
        size += message.chunk.length;
        if (!out.write(message.chunk)) {
          call.pause(); // the disk is slower than the network: let gRPC flow control hold it
          out.once("drain", () => call.resume());
        }
      });
      call.on("error", (error: grpc.ServiceError) => fail(toMetalakeError(error)));
      out.on("error", fail);
      call.on("end", () => {
        if (failed) return;
        out.end(async () => {
          const digest = hash.digest("hex");
          if (!expected || String(size) !== String(expected.size) || digest !== expected.sha256) {
            return fail(
              new Error(
                `download of ${id} does not match: received ${size} bytes with sha256 ${digest}, ` +
                  `expected ${expected?.size} bytes with sha256 ${expected?.sha256}`,
              ),
            );
          }
          try {
            await fs.rename(partial, path);
            resolve(expected);
          } catch (error) {
            fail(error as Error);
          }
        });
      });
    });
  }
}

/**
 * acquired_at and acquired_at_utc_offset from an RFC 3339 string. With an offset
 * ("2021-04-11T15:47:53-05:00" or "...Z") the Timestamp is the exact instant and the offset is
 * kept; without one ("2021-04-11T15:47:53") the wall time travels as if it were UTC and the
 * offset stays absent (unknown), as the contract says.
 */
export function acquiredAt(text: string): Pick<Metadata, "acquired_at" | "acquired_at_utc_offset"> {
  const match = /(?:([+-])(\d\d):(\d\d)|Z)$/i.exec(text);
  const millis = Date.parse(match ? text : `${text}Z`);
  if (Number.isNaN(millis)) throw new Error(`acquired_at ${JSON.stringify(text)} is not RFC 3339`);
  const seconds = Math.floor(millis / 1000);
  const result: Pick<Metadata, "acquired_at" | "acquired_at_utc_offset"> = {
    acquired_at: { seconds: String(seconds), nanos: (millis - seconds * 1000) * 1e6 },
  };
  if (match) {
    const sign = match[1] === "-" ? -1 : 1;
    const offset = match[1] ? sign * (Number(match[2]) * 3600 + Number(match[3]) * 60) : 0;
    result.acquired_at_utc_offset = { seconds: String(offset) };
  }
  return result;
}

/**
 * The inverse of acquiredAt: the wall time the device recorded, with its offset when known
 * ("2021-04-11T15:47:53-05:00"), without one when not ("2021-04-11T15:47:53").
 */
export function formatAcquiredAt(metadata: Metadata | undefined): string | undefined {
  if (!metadata?.acquired_at) return undefined;
  const offset = metadata.acquired_at_utc_offset ? Number(metadata.acquired_at_utc_offset.seconds) : undefined;
  const millis =
    (Number(metadata.acquired_at.seconds) + (offset ?? 0)) * 1000 + Math.floor((metadata.acquired_at.nanos ?? 0) / 1e6);
  const wall = new Date(millis).toISOString().replace(/\.000Z$|Z$/, "");
  if (offset === undefined) return wall;
  const abs = Math.abs(offset);
  const hh = String(Math.floor(abs / 3600)).padStart(2, "0");
  const mm = String(Math.floor((abs % 3600) / 60)).padStart(2, "0");
  return `${wall}${offset < 0 ? "-" : "+"}${hh}:${mm}`;
}

/** A Data as plain JSON: proto-loader's synthetic oneof markers (`_latitude`) dropped. */
export function toJSON(data: Data): unknown {
  return JSON.parse(JSON.stringify(data, (key, value) => (key.startsWith("_") ? undefined : value)));
}
