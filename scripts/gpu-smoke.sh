#!/usr/bin/env bash
# One-command proof that a CUDA build of Tollgate works on an NVIDIA GPU.
#
#   scripts/gpu-smoke.sh BIN [MODEL]
#
# BIN is a tollgate-cli built by scripts/build-cuda.sh (its unpacked folder also holds
# tollgate-bench, llama.cpp's libraries, config/ and adapters/demo.gguf); MODEL defaults to
# models/SmolLM2-135M-Instruct.Q4_1.gguf next to BIN or in the current folder. Needs no network
# and no Rust: bash, python3 (standard library only) and nvidia-smi. The CUDA 13 runtime
# (libcudart.so.13, libcublas.so.13) must be on LD_LIBRARY_PATH.
#
# On GPU 0 (CUDA_VISIBLE_DEVICES=0, every layer offloaded) it: runs the bench's engine-only part
# at 1, 8 and 32 sequences; starts the API on the embedded default (SQLite, in-process worker);
# issues a key and an admin key; sends a generation, one with a LoRA head and an embedding;
# reads the model's GPU memory from nvidia-smi while it runs; loads /v1/chat/completions at
# concurrency 1, 8 and 32 with the bench; and prints one JSON document with llama.cpp's offload
# lines, the memory, tokens/s per part and pass/fail per step. Exit status 0 only when every
# step passed; without a GPU it says why and exits 2.
set -uo pipefail
bin=${1:-}
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo '{"ok": false, "step": "arguments", "reason": "usage: scripts/gpu-smoke.sh path/to/tollgate-cli [model.gguf]"}'
  exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
pkg=$(dirname "$bin")
repo=$(cd "$(dirname "$0")/.." && pwd)
model=${2:-}
for candidate in "$pkg/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf"; do
  [ -z "$model" ] && [ -s "$candidate" ] && model=$candidate
done
fail_early() { # step, reason
  python3 -c 'import json,sys; print(json.dumps({"ok": False, "step": sys.argv[1], "reason": sys.argv[2]}))' "$1" "$2"
  exit 2
}
command -v python3 >/dev/null || { echo '{"ok": false, "step": "preflight", "reason": "python3 not found"}'; exit 2; }
command -v nvidia-smi >/dev/null || fail_early gpu "no NVIDIA GPU here: nvidia-smi not found (this script needs a GPU machine with the NVIDIA driver)"
gpus=$(nvidia-smi -L 2>&1) || fail_early gpu "nvidia-smi found no usable GPU: $gpus"
echo "$gpus" | grep -q '^GPU 0' || fail_early gpu "nvidia-smi lists no GPU 0: $gpus"
[ -n "$model" ] && [ -s "$model" ] || fail_early model "model not found: give its path as the second argument"
export LD_LIBRARY_PATH="$pkg${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$bin" "$pkg"/lib*.so.0 2>/dev/null | grep 'not found' | sort -u)
[ -z "$missing" ] || fail_early libraries "shared libraries not found (put the CUDA 13 runtime on LD_LIBRARY_PATH): $missing"
bench="$pkg/tollgate-bench"
[ -x "$bench" ] || fail_early bench "tollgate-bench not found next to $bin"

work=$(mktemp -d /tmp/tollgate-gpu-smoke.XXXXXX)
mkdir -p "$work/config" "$work/models/adapters" "$work/data"
cp "$pkg/config/development.yaml" "$work/config/" 2>/dev/null || cp "$repo/config/development.yaml" "$work/config/"
# The dashboard's templates and stylesheet: the server refuses to start without them.
cp -r "$pkg/assets" "$work/" 2>/dev/null || cp -r "$repo/assets" "$work/"
ln -s "$model" "$work/models/SmolLM2-135M-Instruct.Q4_1.gguf"
adapter=""
for candidate in "$pkg/adapters/demo.gguf" "$repo/models/adapters/demo.gguf"; do
  [ -z "$adapter" ] && [ -s "$candidate" ] && adapter=$candidate
done
[ -n "$adapter" ] && cp "$adapter" "$work/models/adapters/demo.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CUDA_VISIBLE_DEVICES=0 TOLLGATE_N_GPU_LAYERS=999 TOLLGATE_PARALLEL=32 TOLLGATE_LOOKAHEAD=8
export TOLLGATE_PORT=$port TOLLGATE_BINDING=127.0.0.1 TOLLGATE_DEFAULT_TEMPERATURE=0
export RUST_LOG=${RUST_LOG:-info,llama-cpp-2=info} TOLLGATE_LOG_FORMAT=${TOLLGATE_LOG_FORMAT:-json}
cd "$work" || exit 2

# 1. The bench's engine-only part, before the server holds the GPU.
timeout 150 "$bench" --only engine --reps 3 --max-tokens 64 --concurrency 1,8,32 >engine.json 2>engine.log
echo $? >engine.rc

# 2. The API with its in-process worker on GPU 0.
"$bin" start >server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 240); do
  python3 -c "import json,urllib.request,sys; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:$port/ping', timeout=2)).get('ready') else 1)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || break
  sleep 0.5
done
key=$("$bin" task key:create email=smoke@example.com calls=100000 2>/dev/null | grep -o 'tg_[A-Za-z0-9_]*' | head -n 1)
admin=$("$bin" task key:create email=ops@example.com scope=admin 2>/dev/null | grep -o 'tg_[A-Za-z0-9_]*' | head -n 1)

# 3. Requests, GPU memory and the end-to-end load, then one JSON document.
python3 - "$port" "$key" "$admin" "$server" "$bench" <<'PY'
import json, os, re, subprocess, sys, time, urllib.error, urllib.request

port, key, admin, server_pid, bench = sys.argv[1:6]
base = f"http://127.0.0.1:{port}"
steps, out = {}, {}

def call(path, body, bearer):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except Exception as e:  # noqa: BLE001 - reported as the step's failure
        return 0, {"error": str(e)}

def step(name, ok, detail):
    steps[name] = {"pass": bool(ok), "detail": detail}

try:
    engine_rc = int(open("engine.rc").read().strip() or 1)
    engine = json.loads(open("engine.json").read() or "{}") if engine_rc == 0 else {}
except (OSError, ValueError):
    engine_rc, engine = 1, {}
step("engine_only", engine_rc == 0 and engine.get("levels"), engine.get("levels") or open("engine.log").read()[-2000:])
out["engine_only"] = engine

try:
    with urllib.request.urlopen(base + "/ping", timeout=5) as r:
        ping = json.load(r)
except Exception as e:  # noqa: BLE001
    ping = {"error": str(e)}
step("server_ready", ping.get("ready") is True and bool(key) and bool(admin),
     {"ping": ping, "keys_issued": bool(key) and bool(admin)})
status, body = call("/api/", {"text": "What is the capital of France?", "max_tokens": 32}, key)
step("generate", status == 200 and body.get("message"), {"status": status, "message": body.get("message"), "usage": body.get("usage")})
base_text = body.get("message")
status, body = call("/attach-head", {"name": "demo", "path": "demo.gguf", "scale": 1.0}, admin)
step("attach_head", status == 201, {"status": status, "body": body})
status, body = call("/generate", {"content": "What is the capital of France?", "lora": "demo", "meta": {"temperature": 0, "tokens_limit": 32}}, key)
step("generate_lora", status == 200 and body.get("content") and body.get("content") != base_text,
     {"status": status, "content": body.get("content"), "differs_from_base": body.get("content") != base_text})
status, body = call("/v1/embeddings", {"model": "smollm2", "input": ["a cat", "a dog"]}, key)
dims = [len(d.get("embedding", [])) for d in body.get("data", [])]
step("embedding", status == 200 and dims and all(d > 0 for d in dims), {"status": status, "dimensions": dims})

try:
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    rows = [r.split(",") for r in smi.strip().splitlines() if r.strip()]
    mine = [int(m) for p, m in rows if p.strip() == server_pid]
    gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as e:  # noqa: BLE001
    rows, mine, gpu_name = [], [], f"nvidia-smi failed: {e}"
out["gpu"] = gpu_name
out["server_gpu_memory_mib"] = mine[0] if mine else None
step("model_on_gpu", bool(mine) and mine[0] > 0, {"nvidia_smi": rows})

e2e = subprocess.run([bench, "--only", "external", "--external-url", base, "--external-key", key,
                      "--concurrency", "1,8,32", "--requests", "32", "--max-tokens", "64"],
                     capture_output=True, text=True, timeout=240)
try:
    out["end_to_end"] = json.loads(e2e.stdout)
except ValueError:
    out["end_to_end"] = {}
step("end_to_end", e2e.returncode == 0 and out["end_to_end"].get("levels"), out["end_to_end"].get("levels") or e2e.stderr[-2000:])

# Ratio end to end / engine only, per concurrency level.
eng = {l["sequences"]: l["tokens_per_s"] for l in out["engine_only"].get("levels", [])}
out["ratio_end_to_end_over_engine"] = {
    str(l["concurrency"]): round(l["tokens_per_s"] / eng[l["concurrency"]], 3)
    for l in out["end_to_end"].get("levels", []) if eng.get(l["concurrency"])
}
log = open("server.log", errors="replace").read()
offload = [l.strip() for l in log.splitlines()
           if re.search(r"offload|CUDA0|using device|ggml_cuda_init|Device 0", l)][:20]
out["offload_lines"] = offload
step("layers_offloaded", any(re.search(r"offloaded (\d+)/\1 layers to GPU", l) for l in offload), offload[:5])
out["steps"] = steps
out["ok"] = all(s["pass"] for s in steps.values())
print(json.dumps(out, indent=2, default=str))
sys.exit(0 if out["ok"] else 1)
PY
rc=$?
echo "work folder (logs): $work" >&2
exit $rc
