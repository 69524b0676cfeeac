#!/usr/bin/env node
// A second-language client for tether's gRPC contract (proto/tether/v1/*.proto), in plain Node.js.
//
//   node examples/node_client/run_job.js HOST:PORT MODEL
//
// It lists the hosted models, reads MODEL's module tree, writes a trace program as Python source text,
// runs it over the blocking JobService.RunJob stream with the token ids as a list of ints and a float32
// tensor `x` built from a Float32Array, reassembles the result chunks, decodes the JobResult and the
// saved tensors (raw little-endian bytes; lz4 block data is decompressed here), and prints one JSON line:
//   {"models": [...], "out_shape": [...], "out_sum": ..., ...}
// Progress and errors go to stderr. An API key, when the server wants one, comes from TETHER_API_KEY and
// travels as `authorization: Bearer <key>` metadata. Needs only @grpc/grpc-js and @grpc/proto-loader
// (protobufjs, which proto-loader is built on, decodes the JobResult).
'use strict';

const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// protobufjs as proto-loader itself resolves it (a dependency of proto-loader, not of this script).
const protobuf = require(require.resolve('protobufjs', {
  paths: [path.dirname(require.resolve('@grpc/proto-loader'))],
}));

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILES = ['tether/v1/jobs.proto', 'tether/v1/models.proto'];
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024; // tether's own client limit (GetModel carries tokenizer files)
const DEADLINE_MS = 50 * 1000;
const N_TOKENS = 40; // 40 x 512 float32 logits = 80 KiB: large enough for the server to consider lz4

// Same conversion options for gRPC messages (proto-loader) and for the JobResult (protobufjs).
const CONVERT = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

const DTYPES = {
  // name: [bytes per element, reader(DataView, byteOffset) -> number]
  DATA_TYPE_FLOAT32: [4, (v, o) => v.getFloat32(o, true)],
  DATA_TYPE_FLOAT64: [8, (v, o) => v.getFloat64(o, true)],
  DATA_TYPE_FLOAT16: [2, (v, o) => halfToFloat(v.getUint16(o, true))],
  DATA_TYPE_BFLOAT16: [2, (v, o) => bf16ToFloat(v.getUint16(o, true))],
  DATA_TYPE_INT8: [1, (v, o) => v.getInt8(o)],
  DATA_TYPE_INT16: [2, (v, o) => v.getInt16(o, true)],
  DATA_TYPE_INT32: [4, (v, o) => v.getInt32(o, true)],
  DATA_TYPE_INT64: [8, (v, o) => Number(v.getBigInt64(o, true))],
  DATA_TYPE_UINT8: [1, (v, o) => v.getUint8(o)],
  DATA_TYPE_UINT16: [2, (v, o) => v.getUint16(o, true)],
  DATA_TYPE_UINT32: [4, (v, o) => v.getUint32(o, true)],
  DATA_TYPE_UINT64: [8, (v, o) => Number(v.getBigUint64(o, true))],
  DATA_TYPE_BOOL: [1, (v, o) => v.getUint8(o)],
};

function fail(message) {
  process.stderr.write(`run_job.js: ${message}\n`);
  process.exit(1);
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function bf16ToFloat(b) {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, b << 16, false);
  return view.getFloat32(0, false);
}

// ------------------------------------------------------------------------------------------- loading

function loadServices() {
  const definition = protoLoader.loadSync(PROTO_FILES, { ...CONVERT, includeDirs: [PROTO_DIR] });
  return grpc.loadPackageDefinition(definition).tether.v1;
}

function loadJobResultType() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => (path.isAbsolute(target) ? target : path.join(PROTO_DIR, target));
  root.loadSync(PROTO_FILES, { keepCase: true });
  root.resolveAll();
  return root.lookupType('tether.v1.JobResult');
}

function callOptions() {
  return { deadline: Date.now() + DEADLINE_MS };
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.TETHER_API_KEY) md.set('authorization', `Bearer ${process.env.TETHER_API_KEY}`);
  return md;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), callOptions(), (error, response) => {
      if (error) reject(new Error(`${method} failed: ${grpc.status[error.code]} ${error.details}`));
      else resolve(response);
    });
  });
}

// ------------------------------------------------------------------------------------------- values

// A Tensor message: dtype, shape, raw little-endian element bytes, uncompressed.
function float32Tensor(array, shape) {
  const bytes = Buffer.alloc(array.length * 4);
  array.forEach((x, i) => bytes.writeFloatLE(x, i * 4));
  return { data_type: 'DATA_TYPE_FLOAT32', shape, data: bytes, compression: 'COMPRESSION_NONE' };
}

// LZ4 raw block format (no frame, no size header): sequences of literals then a back-reference.
function lz4BlockDecompress(src, size) {
  const out = Buffer.alloc(size);
  let s = 0;
  let d = 0;
  const length = (n) => {
    if (n !== 15) return n;
    let b;
    do {
      if (s >= src.length) throw new Error('lz4: truncated length');
      b = src[s++];
      n += b;
    } while (b === 255);
    return n;
  };
  while (s < src.length) {
    const token = src[s++];
    const literals = length(token >> 4);
    if (s + literals > src.length || d + literals > size) throw new Error('lz4: literals overrun');
    src.copy(out, d, s, s + literals);
    s += literals;
    d += literals;
    if (s >= src.length) break; // the last sequence has literals only
    const offset = src[s] | (src[s + 1] << 8);
    s += 2;
    if (offset === 0 || offset > d) throw new Error(`lz4: bad match offset ${offset}`);
    const match = length(token & 15) + 4;
    if (d + match > size) throw new Error('lz4: match overrun');
    for (let i = 0; i < match; i++, d++) out[d] = out[d - offset]; // may overlap: byte by byte
  }
  if (d !== size) throw new Error(`lz4: decompressed ${d} bytes, expected ${size}`);
  return out;
}

// A decoded Tensor message: {dtype, shape, compression, values (Float64Array)}.
function decodeTensor(msg) {
  const dtype = DTYPES[msg.data_type];
  if (!dtype) fail(`saved tensor has data type ${msg.data_type}, which this client does not decode`);
  const [itemSize, read] = dtype;
  const shape = msg.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const nbytes = count * itemSize;
  let data = Buffer.from(msg.data);
  if (msg.compression === 'COMPRESSION_LZ4') {
    data = lz4BlockDecompress(data, nbytes);
  } else if (msg.compression !== 'COMPRESSION_NONE' && msg.compression !== 'COMPRESSION_UNSPECIFIED') {
    fail(`saved tensor has unknown compression ${msg.compression}`);
  }
  if (data.length !== nbytes) fail(`tensor data is ${data.length} bytes, expected ${nbytes} for ${shape}`);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = new Float64Array(count);
  for (let i = 0; i < count; i++) values[i] = read(view, i * itemSize);
  return { dtype: msg.data_type, shape, compression: msg.compression, values };
}

function savedTensor(result, name) {
  const value = result.saved[name];
  if (!value) fail(`the job saved no value named ${name}; it saved ${Object.keys(result.saved)}`);
  if (value.kind !== 'tensor') fail(`saved value ${name} is a ${value.kind}, not a tensor`);
  return decodeTensor(value.tensor);
}

// ------------------------------------------------------------------------------------------- program

// `transformer.h.0` -> `transformer.h[0]`: a module path as Python attribute access on the model.
function accessor(dotted) {
  return dotted.split('.').map((part) => (/^\d+$/.test(part) ? `[${part}]` : `.${part}`)).join('').slice(1);
}

// The first transformer block, the output head and the hidden width, from GetModel's module tree/config.
function layout(spec) {
  const byPath = new Map(spec.modules.map((m) => [m.path, m]));
  const block = spec.modules.find((m) => {
    const parent = m.path.includes('.') ? m.path.slice(0, m.path.lastIndexOf('.')) : null;
    return m.path.endsWith('.0') && parent && byPath.get(parent).class_name === 'ModuleList';
  });
  const head = byPath.get('lm_head') || [...spec.modules].reverse().find((m) => m.class_name === 'Linear');
  if (!block || !head) fail(`model ${spec.info.name} has no ModuleList of blocks or no output head`);
  const config = spec.config_json ? JSON.parse(spec.config_json) : {};
  const inFeatures = /in_features=(\d+)/.exec(head.extra_repr);
  const width = config.n_embd || config.hidden_size || (inFeatures && Number(inFeatures[1]));
  const vocab = config.vocab_size || Number((/out_features=(\d+)/.exec(head.extra_repr) || [])[1]);
  if (!width || !vocab) fail(`cannot tell the hidden width or vocabulary size of ${spec.info.name}`);
  return { block: accessor(block.path), head: accessor(head.path), width, vocab };
}

function buildJob(modelName, shape) {
  const tokenIds = Array.from({ length: N_TOKENS }, (_, i) => (i * 37 + 11) % shape.vocab);
  const x = new Float32Array(shape.width);
  for (let i = 0; i < x.length; i++) x[i] = 0.5 + (i % 7) / 8;
  const source = [
    `h = model.${shape.block}.output`,
    'h[:] = h * x',
    `out = model.${shape.head}.output.save()`,
    'q = (out * 4).round().save()', // small integers: compressible, so the server may send it as lz4
    '',
  ].join('\n');
  const program = {
    kind: 'PROGRAM_KIND_TRACE',
    source,
    filename: 'run_job.js',
    first_line: 1,
    model: modelName,
    args: [{ list_value: { items: tokenIds.map((id) => ({ int_value: id })) } }],
    bindings: {
      model: { model_reference: { name: modelName, path: '' } },
      x: { tensor: float32Tensor(x, [x.length]) },
    },
  };
  const job = { program, request_id: crypto.randomUUID() };
  return { job, tokenIds, x, source };
}

// Runs the job on a RunJob stream; resolves with {jobId, states, logs, result (decoded JobResult)}.
function runJob(jobs, job, JobResult) {
  return new Promise((resolve, reject) => {
    const call = jobs.RunJob(metadata(), callOptions());
    const chunks = [];
    const states = [];
    const logs = [];
    let jobId = '';
    let final = null;
    // One response may carry several events: `event`, then `more_events` (events ready together), in order.
    call.on('data', (response) => {
      for (const event of [response.event, ...(response.more_events || [])]) onEvent(event);
    });
    const onEvent = (event) => {
      jobId = event.job_id;
      if (event.event === 'status') {
        states.push(event.status.state);
        process.stderr.write(`job ${jobId} #${event.sequence}: ${event.status.state} ${event.status.message}\n`);
        if (['JOB_STATE_COMPLETED', 'JOB_STATE_ERROR', 'JOB_STATE_CANCELLED'].includes(event.status.state)) {
          final = event.status;
          call.end(); // nothing more to send (this program has no local() blocks to answer)
        }
      } else if (event.event === 'log') {
        logs.push(event.log.text);
      } else if (event.event === 'result') {
        chunks.push(event.result);
      } else if (event.event === 'local_call') {
        call.write({ cancel: { reason: 'this client runs no local() blocks' } });
      }
    };
    call.on('error', (error) => reject(new Error(`RunJob failed: ${grpc.status[error.code]} ${error.details}`)));
    call.on('end', () => {
      if (!final) return reject(new Error('RunJob stream ended before a terminal state'));
      if (final.state !== 'JOB_STATE_COMPLETED') {
        const f = final.failure || {};
        return reject(new Error(`job ${jobId} ended in ${final.state}: ${final.message}\n${f.traceback || ''}`));
      }
      try {
        resolve({ jobId, states, logs, result: decodeResult(chunks, JobResult) });
      } catch (error) {
        reject(error);
      }
    });
    call.write({ job });
  });
}

// Appends the result chunks in offset order, checks the total size, and decodes the JobResult.
function decodeResult(chunks, JobResult) {
  if (!chunks.length) throw new Error('the job completed without result chunks');
  chunks.sort((a, b) => a.offset - b.offset);
  const total = chunks[0].total_size;
  const whole = Buffer.alloc(total);
  let filled = 0;
  for (const chunk of chunks) {
    if (chunk.offset !== filled) throw new Error(`result chunk at offset ${chunk.offset}, expected ${filled}`);
    Buffer.from(chunk.data).copy(whole, chunk.offset);
    filled += chunk.data.length;
  }
  if (filled !== total) throw new Error(`result chunks hold ${filled} bytes of ${total}`);
  return JobResult.toObject(JobResult.decode(whole), CONVERT);
}

function sum(values, f = (v) => v) {
  let s = 0;
  for (const v of values) s += f(v);
  return s;
}

async function main() {
  const [address, modelName] = process.argv.slice(2);
  if (!address || !modelName) fail('usage: node examples/node_client/run_job.js HOST:PORT MODEL');
  const v1 = loadServices();
  const JobResult = loadJobResultType();
  const options = {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  };
  const credentials = grpc.credentials.createInsecure();
  const models = new v1.ModelService(address, credentials, options);
  const jobs = new v1.JobService(address, credentials, options);
  try {
    const listed = await unary(models, 'ListModels', {});
    const names = listed.models.map((m) => m.name);
    process.stderr.write(`models: ${names.join(', ')}\n`);
    const { spec } = await unary(models, 'GetModel', { name: modelName });
    const shape = layout(spec);
    const { job, tokenIds, x, source } = buildJob(modelName, shape);
    const run = await runJob(jobs, job, JobResult);
    const out = savedTensor(run.result, 'out');
    const q = savedTensor(run.result, 'q');
    const report = {
      models: names,
      architecture: spec.info.architecture,
      job_id: run.jobId,
      states: run.states,
      program: source,
      token_ids: tokenIds,
      x: Array.from(x),
      out_dtype: out.dtype,
      out_shape: out.shape,
      out_compression: out.compression,
      out_sum: sum(out.values),
      out_abs_sum: sum(out.values, Math.abs),
      out_head: Array.from(out.values.slice(0, 8)),
      q_shape: q.shape,
      q_compression: q.compression,
      q_sum: sum(q.values),
      q_abs_sum: sum(q.values, Math.abs),
    };
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } finally {
    models.close();
    jobs.close();
  }
}

main().catch((error) => fail(error.message));
