// End to end against a real metalake server (METALAKE_TARGET), run by run-ci.sh: `npm test`.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import * as grpc from "@grpc/grpc-js";

import { CHUNK_SIZE, MetalakeClient, MetalakeError, acquiredAt, formatAcquiredAt } from "../client";

if (!process.env.METALAKE_TARGET) throw new Error("set METALAKE_TARGET to a metalake server's host:port");

const client = new MetalakeClient();
const dir = mkdtempSync(join(tmpdir(), "metalake-node-"));
const CLI = join(__dirname, "..", "cli.js");
const TIMEOUT = { timeout: 60_000 };
after(() => {
  client.close();
  rmSync(dir, { recursive: true, force: true });
});

// A tiny valid JPEG (1x1 pixel, baseline), unique through a comment segment, with an EXIF
// APP1 segment naming the camera's maker when `make` is given.
function jpeg(comment: string, make?: string): Buffer {
  const image = Buffer.from(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b080001000101011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00fbd3ffd9",
    "hex",
  );
  const segment = (marker: number, body: Buffer) => {
    const head = Buffer.from([0xff, marker, 0, 0]);
    head.writeUInt16BE(body.length + 2, 2);
    return Buffer.concat([head, body]);
  };
  const parts = [image.subarray(0, 2)]; // SOI
  if (make) {
    // TIFF, big-endian: IFD0 at 8 with one entry, Make (0x010f, ASCII), its text at 26.
    const text = Buffer.from(`${make}\0`, "latin1");
    assert.ok(text.length > 4, "an ASCII value of 4 bytes or less would be stored inline");
    const tiff = Buffer.alloc(26);
    tiff.write("MM\0*", 0, "latin1");
    tiff.writeUInt32BE(8, 4);
    tiff.writeUInt16BE(1, 8);
    tiff.writeUInt16BE(0x010f, 10);
    tiff.writeUInt16BE(2, 12);
    tiff.writeUInt32BE(text.length, 14);
    tiff.writeUInt32BE(26, 18);
    tiff.writeUInt32BE(0, 22); // no next IFD
    parts.push(segment(0xe1, Buffer.concat([Buffer.from("Exif\0\0", "latin1"), tiff, text])));
  }
  parts.push(segment(0xfe, Buffer.from(comment)), image.subarray(2));
  return Buffer.concat(parts);
}

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

function expectRefusal(code: grpc.status, check?: (error: MetalakeError) => void) {
  return (error: unknown) => {
    assert.ok(error instanceof MetalakeError, `not a MetalakeError: ${error}`);
    assert.equal(error.codeName, grpc.status[code], error.message);
    check?.(error);
    return true;
  };
}

test("uploads with metadata and fill_metadata, lists with a filter, downloads verified", TIMEOUT, async () => {
  const path = join(dir, "drone.jpg");
  writeFileSync(path, jpeg(`node-${randomUUID()}`, "NodeCam Optics"));
  const reference = `NODE-${randomUUID()}`;
  const acquired = "2021-04-11T15:47:53-05:00";
  const data = await client.uploadData(path, {
    metadata: { reference, latitude: 0, ...acquiredAt(acquired) },
    fillMetadata: true,
    tags: ["node", "e2e"],
  });
  assert.equal(data.filename, "drone.jpg");
  assert.equal(data.content_type, "image/jpeg");
  assert.equal(data.size, String(readFileSync(path).length));
  assert.equal(data.sha256, sha256(path));
  assert.deepEqual([...(data.tags ?? [])].sort(), ["e2e", "node"]);

  for (const item of [data, await client.getData(data.id)]) {
    const metadata = item.metadata ?? {};
    assert.equal(metadata.reference, reference);
    assert.equal(metadata.latitude, 0); // present and zero: the equator
    assert.ok(!("longitude" in metadata), "longitude was never given: it must be absent");
    // acquired_at is the exact instant; the offset is the one the device recorded.
    assert.equal(metadata.acquired_at?.seconds, String(Date.parse("2021-04-11T20:47:53Z") / 1000));
    assert.equal(metadata.acquired_at_utc_offset?.seconds, String(-5 * 3600));
    assert.equal(formatAcquiredAt(metadata), acquired);
    // fill_metadata filled what the client did not give, from the file's EXIF.
    assert.equal(metadata.manufacturer, "NodeCam Optics");
    assert.equal(item.metadata_sources?.reference, "client");
    assert.equal(item.metadata_sources?.acquired_at, "client");
    assert.ok(item.metadata_sources?.manufacturer, "manufacturer has a source");
    assert.notEqual(item.metadata_sources?.manufacturer, "client");
  }

  const listed = await client.listData(
    `reference = "${reference}" AND tags:"node" AND latitude = 0 AND acquired_at >= "2021-04-11T20:00:00Z"`,
  );
  assert.deepEqual(
    listed.map((d) => d.id),
    [data.id],
  );
  assert.deepEqual(await client.listData(`reference = "${reference}" AND longitude:*`), []);

  const copy = join(dir, "copy.jpg");
  const downloaded = await client.downloadData(data.id, copy);
  assert.equal(downloaded.sha256, data.sha256);
  assert.equal(sha256(copy), data.sha256);
  assert.ok(!existsSync(`${copy}.part`));
});

test("a file of several chunks round-trips, and a wall time without offset stays without one", TIMEOUT, async () => {
  const path = join(dir, "big.bin");
  const bytes = Buffer.alloc(3 * CHUNK_SIZE + 12345);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7919) & 0xff;
  writeFileSync(path, bytes);
  const data = await client.uploadData(path, { metadata: acquiredAt("2024-05-01T12:00:00") });
  assert.equal(data.size, String(bytes.length));
  assert.equal(data.sha256, sha256(path));
  assert.equal(data.metadata?.acquired_at?.seconds, String(Date.parse("2024-05-01T12:00:00Z") / 1000));
  assert.ok(!data.metadata?.acquired_at_utc_offset, "no offset was given: it must stay unknown");
  assert.equal(formatAcquiredAt(data.metadata), "2024-05-01T12:00:00");
  const copy = join(dir, "big.copy");
  await client.downloadData(data.id, copy);
  assert.deepEqual(readFileSync(copy), bytes);
});

test("listing follows page tokens to the last page", TIMEOUT, async () => {
  const reference = `PAGES-${randomUUID()}`;
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    const path = join(dir, `page-${i}.jpg`);
    writeFileSync(path, jpeg(`${reference}-${i}`));
    ids.push((await client.uploadData(path, { metadata: { reference, custom_id: String(i) } })).id);
  }
  const listed = await client.listData(`reference = "${reference}"`, "custom_id desc", 2);
  assert.deepEqual(
    listed.map((d) => d.id),
    [...ids].reverse(),
  );
});

test("an invalid latitude is INVALID_ARGUMENT naming header.metadata.latitude", TIMEOUT, async () => {
  const path = join(dir, "bad.jpg");
  writeFileSync(path, jpeg("bad"));
  await assert.rejects(
    client.uploadData(path, { metadata: { latitude: 95 } }),
    expectRefusal(grpc.status.INVALID_ARGUMENT, (error) => {
      assert.ok(
        error.violations.some((v) => v.field === "header.metadata.latitude"),
        JSON.stringify(error.violations),
      );
      assert.ok(error.requestId, "every answer carries its x-request-id");
    }),
  );
});

test("a filter that does not parse is INVALID_ARGUMENT on the field filter, saying where", TIMEOUT, async () => {
  await assert.rejects(
    client.listData("latitude >>= 3"),
    expectRefusal(grpc.status.INVALID_ARGUMENT, (error) => {
      assert.deepEqual(
        error.violations.map((v) => v.field),
        ["filter"],
      );
      assert.match(error.message, /column/);
    }),
  );
});

test("an unknown id is NOT_FOUND, and a failed download leaves no file", TIMEOUT, async () => {
  await assert.rejects(client.getData(randomUUID()), expectRefusal(grpc.status.NOT_FOUND));
  const path = join(dir, "missing.bin");
  await assert.rejects(client.downloadData(randomUUID(), path), expectRefusal(grpc.status.NOT_FOUND));
  assert.ok(!existsSync(path) && !existsSync(`${path}.part`));
});

function cli(...args: string[]) {
  const result = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: process.env, timeout: 30_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}

test("the CLI uploads, lists with a filter and downloads", TIMEOUT, async () => {
  const path = join(dir, "cli.jpg");
  writeFileSync(path, jpeg(`cli-${randomUUID()}`, "NodeCam Optics"));
  const reference = `CLI-${randomUUID()}`;
  const up = cli("upload", path, "--meta", `reference=${reference}`, "--meta", "acquired_at=2021-04-11T15:47:53+02:00", "--fill-metadata");
  assert.equal(up.code, 0, up.stderr);
  const uploaded = JSON.parse(up.stdout);
  assert.equal(uploaded.metadata.reference, reference);
  assert.equal(uploaded.metadata.acquired_at_text, "2021-04-11T15:47:53+02:00");
  assert.equal(uploaded.metadata.manufacturer, "NodeCam Optics");

  const ls = cli("ls", "--filter", `reference = "${reference}"`);
  assert.equal(ls.code, 0, ls.stderr);
  assert.deepEqual(
    ls.stdout
      .trim()
      .split("\n")
      .map((line) => JSON.parse(line).id),
    [uploaded.id],
  );

  const copy = join(dir, "cli.copy.jpg");
  const down = cli("download", uploaded.id, "-o", copy);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, /verified/);
  assert.equal(sha256(copy), sha256(path));
});

test("the CLI shows the fields at fault and exits 1; a usage error exits 2", TIMEOUT, async () => {
  const path = join(dir, "cli-bad.jpg");
  writeFileSync(path, jpeg("cli-bad"));
  const bad = cli("upload", path, "--meta", "latitude=95");
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /INVALID_ARGUMENT/);
  assert.match(bad.stderr, /header\.metadata\.latitude: /);
  assert.equal(cli("download", "some-id").code, 2);
  assert.equal(cli("frobnicate").code, 2);
});
