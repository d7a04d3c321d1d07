// End to end against a real metalake server (METALAKE_TARGET), run by run-ci.sh.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import * as grpc from "@grpc/grpc-js";

import { MetalakeClient, MetalakeError, acquiredAt } from "../src/client";

const client = new MetalakeClient();
const dir = mkdtempSync(join(tmpdir(), "metalake-node-"));
after(() => client.close());

// A tiny valid JPEG (1x1 pixel), unique per test through a comment segment.
function jpeg(tag: string): Buffer {
  const head = Buffer.from(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b080001000101011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00fbd3ffd9",
    "hex",
  );
  const comment = Buffer.from(tag);
  const segment = Buffer.concat([Buffer.from([0xff, 0xfe, 0, comment.length + 2]), comment]);
  return Buffer.concat([head.subarray(0, 2), segment, head.subarray(2)]);
}

test("uploads with metadata and fill_metadata, lists with a filter, downloads verified", async () => {
  const path = join(dir, "drone.jpg");
  writeFileSync(path, jpeg(`node-${Date.now()}`));
  const reference = `NODE-${process.pid}-${Date.now()}`;
  const data = await client.uploadData(path, {
    metadata: { reference, latitude: 0, ...acquiredAt("2021-04-11T15:47:53-05:00") },
    fillMetadata: true,
    tags: ["node"],
  });
  assert.equal(data.filename, "drone.jpg");
  assert.equal(data.content_type, "image/jpeg");
  assert.equal(data.sha256, createHash("sha256").update(readFileSync(path)).digest("hex"));
  assert.equal(data.metadata?.latitude, 0); // present and zero: the equator
  assert.equal(data.metadata?.longitude, undefined); // absent
  assert.equal(data.metadata?.acquired_at?.seconds, String(Date.parse("2021-04-11T20:47:53Z") / 1000));
  assert.equal(data.metadata?.acquired_at_utc_offset?.seconds, String(-5 * 3600));
  assert.equal(data.metadata_sources?.reference, "client");

  const listed = await client.listData(`reference = "${reference}" AND tags:"node"`);
  assert.deepEqual(listed.map((d) => d.id), [data.id]);

  const copy = join(dir, "copy.jpg");
  const downloaded = await client.downloadData(data.id, copy);
  assert.equal(downloaded.sha256, data.sha256);
  assert.deepEqual(readFileSync(copy), readFileSync(path));
});

test("an invalid latitude is INVALID_ARGUMENT naming the field", async () => {
  const path = join(dir, "bad.jpg");
  writeFileSync(path, jpeg("bad"));
  await assert.rejects(client.uploadData(path, { metadata: { latitude: 95 } }), (error: unknown) => {
    assert.ok(error instanceof MetalakeError);
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.ok(error.violations.some((v) => v.field === "header.metadata.latitude"));
    return true;
  });
});

test("a filter that does not parse says where", async () => {
  await assert.rejects(client.listData("latitude >>= 3"), (error: unknown) => {
    assert.ok(error instanceof MetalakeError);
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.match(error.message, /column/);
    return true;
  });
});
