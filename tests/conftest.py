"""Shared fixtures: tiny configs that train in seconds, and no W&B network traffic anywhere."""

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_DATA = {"arithmetic": {"train_pairs": 128, "eval_pairs": 32, "eval_problems": 16,
                            "pretrain_examples": 2000, "sft_examples": 1000}}


def tiny_run(**sections) -> dict:
    """A run config (plain dict) on the arithmetic task from an untrained model: seconds on a CPU. A fresh
    copy every call: a test that edits its config (`raw["data"]["arithmetic"] = ...`) must not change the next
    test's in the same process (it did: another test's 16 training pairs reached the rounds sweep test under
    xdist, depending on which worker ran what)."""
    raw = {
        "loss": {"name": "dpo", "beta": 0.1},
        "model": {"init": "scratch", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "data": copy.deepcopy(TINY_DATA),
        "train": {"max_steps": 6, "batch_size": 16, "eval_every": 3, "probe_every": 3, "log_every": 3,
                  "learning_rate": 1e-3, "warmup_steps": 0, "num_threads": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def pytest_collection_modifyitems(items):
    """The slow (Ray, multi-process) tests first, each file's in its order: parallel workers (`make test` runs
    three) then take the long tests early and finish on the short ones together, instead of one worker being
    left with a 5-minute test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def init_cache(tmp_path_factory):
    """One init cache for the whole session, so built-in inits are built once."""
    return str(tmp_path_factory.mktemp("init_cache"))


# ---------------------------------------------------------------------------------------------------
# A real S3-compatible server on 127.0.0.1 (moto's server mode, as in Ray's own storage tests)

def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server started for this test session (skipped without moto)."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) provides the local S3 server")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the moto S3 server did not start")
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the local server, with this process's environment pointing at it (as a user's
    would: AWS_ENDPOINT_URL and credentials). Returns (bucket name, boto3 client)."""
    import uuid

    import boto3

    for key, value in {**S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    name = f"spo-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name, client


class TcpProxy:
    """127.0.0.1:`port` forwarding to 127.0.0.1:`target_port`, that can play a store gone down: `down()`
    stops listening and cuts every open connection, so clients get "connection refused" (what a stopped
    server or a lost route gives); `up()` listens on the same port again."""

    def __init__(self, target_port: int):
        import threading
        self.target_port, self.port = target_port, _free_port()
        self.lock, self.connections, self.listener = threading.Lock(), [], None
        self.up()

    def up(self) -> None:
        import socket
        import threading
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        import socket
        with self.lock:
            for sock in [self.listener, *self.connections]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() or recv()
                except OSError:
                    pass
                sock.close()
            self.connections = []

    def _accept(self, listener) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                if listener.fileno() == -1:
                    return
                continue
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        import socket
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def s3_proxy(s3_server):
    """A `TcpProxy` in front of the session's S3 server: point a client at 127.0.0.1:`proxy.port`."""
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    yield proxy
    proxy.down()


# ---------------------------------------------------------------------------------------------------
# Two (or more) gloo workers on this CPU, that fail instead of hanging

def _gloo_entry(rank, world_size, store_path, timeout_s, worker, args):
    """A spawned worker: join the process group through a file (no TCP store living in rank 0's process, so
    no rank waits on a peer that already exited), run `worker(rank, world_size, *args)`, then leave together."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        worker(rank, world_size, *args)
        dist.barrier()  # neither worker leaves while the other may still be in a collective
    finally:
        dist.destroy_process_group()


def run_gloo_workers(worker, args: tuple, tmp_path, nprocs: int = 2, timeout_s: float = 300) -> None:
    """Run `worker(rank, nprocs, *args)` in `nprocs` spawned gloo processes; fail the test (and kill them) if
    one raises, or if they are not all done within `timeout_s` (a stuck collective must not hang the suite).

    A worker killed by SIGABRT inside torch's C++ ("terminate called without an active exception", "double
    free or corruption") is run again once, with a warning: under parallel test workers this happened twice in
    about 35 runs of the FSDP gloo tests (issue 25 notes), never with the test alone, and never as a wrong
    value. A Python error, a wrong value or a second abort fails the test."""
    import warnings

    from torch.multiprocessing import ProcessExitedException

    try:
        _run_gloo_workers_once(worker, args, tmp_path, nprocs, timeout_s)
    except ProcessExitedException as error:
        if error.signal_name != "SIGABRT":
            raise
        warnings.warn(f"a gloo worker aborted in torch's C++ ({error}); running the workers once more")
        _run_gloo_workers_once(worker, args, tmp_path, nprocs, timeout_s)


def _run_gloo_workers_once(worker, args: tuple, tmp_path, nprocs: int, timeout_s: float) -> None:
    import time

    import torch.multiprocessing as mp

    store = tmp_path / f"gloo-store-{time.monotonic_ns()}"
    context = mp.start_processes(_gloo_entry, args=(nprocs, str(store), timeout_s / 2, worker, args),
                                 nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} gloo workers did not finish within {timeout_s:.0f} s")


# ---------------------------------------------------------------------------------------------------
# Float32 tolerances that hold on any CPU: compare against a float64 oracle, scaled by float32's own error
#
# torch's CPU kernels (default, AVX2, AVX-512; one thread or many) sum in different orders, so a float32
# result moves by a few units of float32's eps × the magnitude × the depth of the computation from one
# machine to the next. A fixed rtol/atol tuned on one CPU fails on another. Instead, a float32 path under
# test is compared with the same computation in float64 (the oracle, exact to ~1e-16), and must be no
# further from it than the plain float32 computation is, within a factor: both paths round the same
# number of operations, so their distances to the oracle are of the same size on every CPU.

FLOAT32_EPS = 1.1920929e-07
ACCURACY_FACTOR = 4.0  # measured worst ratio 1.09 over 9 losses × {default, avx2} × {1, 2} threads
EPS_FLOOR = 8  # for tensors where the plain path happens to land within a few eps of the oracle


def assert_as_accurate_as_float32(got, plain, exact, name: str = "", scale=None) -> None:
    """`got` (float32, the path under test) is within ACCURACY_FACTOR × (the plain float32 path's
    distance to the float64 oracle `exact` + EPS_FLOOR float32 eps of `scale`). `scale` is the size the
    rounding is relative to: by default the oracle's largest entry; pass the inputs' size where `exact` is
    a difference of larger numbers (a loss or a log-ratio from log-probs of tens of nats)."""
    import torch

    got, plain, exact = (torch.as_tensor(t).double() for t in (got, plain, exact))
    scale = exact.abs().max() if scale is None else torch.as_tensor(float(scale)).double()
    own_error = (plain - exact).abs().max()
    allowed = ACCURACY_FACTOR * (own_error + EPS_FLOOR * FLOAT32_EPS * scale)
    error = (got - exact).abs().max()
    assert error <= allowed, (f"{name}: float32 path {error.item():.3e} from the float64 oracle, "
                              f"plain float32 {own_error.item():.3e}, allowed {allowed.item():.3e}")


# A float32 model forward is too deep to count its roundings; it may be off by as much as the check above lets an
# accurate path be (ACCURACY_FACTOR × EPS_FLOOR eps of its size), e.g. when two forwards of the same rows are
# compared without an oracle.
FORWARD_ROUNDINGS = ACCURACY_FACTOR * EPS_FLOOR


def rounding_tolerance(scale, roundings: float, dtype=None) -> float:
    """roundings × eps × `scale`: the most `roundings` rounding steps on values no larger than `scale` can
    move a result that depends on each with a derivative of at most 1. Each step is off by at most eps/2
    of its value, so this holds with a factor 2 of headroom on every CPU kernel. Float32 unless `dtype`."""
    import torch

    return roundings * torch.finfo(dtype or torch.float32).eps * float(abs(scale))


def naive_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation by the plain loop: the whole sequence through the model for every token, no cache,
    no batch (the oracle of the batched, cached decoders), up to and including the first stop token."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(torch.tensor([ids + generated])).logits[0, -1].argmax().item()
        generated.append(token)
        if token in stop_ids:
            break
    return generated


# ---------------------------------------------------------------------------------------------------
# W&B offline runs, read back

def read_wandb_records(path: Path) -> list:
    """Parse a `.wandb` transaction log: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks.

    Each chunk is crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last); a block's
    tail shorter than a chunk header is padding. wandb 0.31 ships no reader, so this is the format itself.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
