"""Nothing lost, nothing hung, nothing caught late (issue 14): one test per failure of the fault and
bad-input campaign. Runs are tiny (K = 2, 64 px, 1-2 steps) and, where they can be, in this process."""

import contextlib
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import ROOT, reset_accelerate_state
from test_train_inputs import args_for, no_model_loading

import train_drpo
from pipelines import checkpoints, config, files, report
from pipelines.rewards import RewardError
from pipelines.rewards.remote import encode_png

BIN = os.path.dirname(sys.executable)
REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")


def fast_args(output_dir, *extra):
    """The smallest run that still trains: K = 2, one pair, 64 px, a checkpoint every step."""
    return args_for(output_dir, "--num_candidates=2", "--num_pairs=1", "--checkpointing_steps=1",
                    "--reward=color_match", *extra)


def run_main(argv, **kwargs):
    reset_accelerate_state()
    try:
        train_drpo.main(train_drpo.parse_args(argv), **kwargs)
    finally:
        reset_accelerate_state()


@pytest.fixture
def no_final_check(monkeypatch):
    """Skip the final held-out check (a fresh pipeline and two reward tables): these tests need the steps
    and the checkpoints only."""
    monkeypatch.setattr(report, "finish_training", lambda *args, **kwargs: {})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(condition, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {seconds} s")


# ---------------------------------------------------------------------------------------------
# 1. A new run in an old output folder
# ---------------------------------------------------------------------------------------------


def test_a_second_run_in_an_output_dir_is_refused_naming_what_differs(tmp_path, no_final_check):
    run_main(fast_args(tmp_path, "--max_train_steps=2"))
    other = fast_args(tmp_path, "--max_train_steps=2", "--seed=1", "--learning_rate=3e-4")
    with pytest.raises(ValueError, match=r"(?s)checkpoint-1, checkpoint-2 of another run.*--learning_rate: 0.0001 -> "
                                         r"0.0003.*--seed: 0 -> 1.*--overwrite_output_dir"):
        run_main(other, load_pipeline=no_model_loading)
    run_main([*other, "--overwrite_output_dir"])  # deletes the first run's checkpoints, then trains
    assert checkpoints.read_run(str(tmp_path / "checkpoint-2"))["seed"] == 1
    # The first run's command resuming "latest" would now continue the second run: refused, naming the flags.
    with pytest.raises(checkpoints.CheckpointError, match=r"(?s)checkpoint-2 belongs to another run.*--learning_rate"
                                                          r".*--seed: 1 -> 0"):
        run_main(fast_args(tmp_path, "--max_train_steps=4", "--resume_from_checkpoint=latest"))
    # Only the step budget may change on resume.
    resumed = train_drpo.build_config(train_drpo.parse_args([*other, "--max_train_steps=3",
                                                             "--resume_from_checkpoint=latest"]))
    recorded = checkpoints.read_run(str(tmp_path / "checkpoint-2"))
    resumed = resumed.resolved(run={"mixed_precision": "no"}, model={"resolution": 64})  # as main() resolves them
    assert checkpoints.record_differences(recorded, config.run_record(
        resumed, prompt_encoding=recorded["prompt_encoding"], num_processes=1, inputs=recorded["inputs"])) == []


def test_a_resume_after_the_prompts_changed_or_past_the_step_budget_is_refused(tmp_path, no_final_check):
    """The record holds the prompts' content (and a custom reward file's), not their path; a checkpoint past
    --max_train_steps is refused before any model loads."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle at the top\na small blue square on the left\n")
    output = tmp_path / "out"
    run_main(fast_args(output, "--max_train_steps=2", f"--prompts_file={prompts}"))
    assert set(checkpoints.read_run(str(output / "checkpoint-2"))["inputs"]) == {"prompts_sha256"}
    with pytest.raises(ValueError, match=r"checkpoint-2 is at step 2, past --max_train_steps=1: give --max_train_steps "
                                         r"above 2 to train on"):
        run_main(fast_args(output, "--max_train_steps=1", f"--prompts_file={prompts}",
                           "--resume_from_checkpoint=latest"), load_pipeline=no_model_loading)
    prompts.write_text("a large green circle at the top\na small blue square on the left\n")  # same path
    with pytest.raises(checkpoints.CheckpointError, match=r"(?s)checkpoint-2 belongs to another run.*"
                                                          r"inputs.prompts_sha256"):
        run_main(fast_args(output, "--max_train_steps=3", f"--prompts_file={prompts}",
                           "--resume_from_checkpoint=latest"))


@pytest.mark.parametrize("damaged", [checkpoints.RUN_FILE, checkpoints.CHECKSUM_FILE])
def test_a_damaged_run_or_checksum_record_names_the_checkpoint_and_the_file(tmp_path, no_final_check, damaged):
    run_main(fast_args(tmp_path, "--max_train_steps=2"))
    record = tmp_path / "checkpoint-2" / damaged
    record.write_text(record.read_text()[:20])
    with pytest.raises(checkpoints.CheckpointError, match=rf"checkpoint-2 is damaged: {damaged} is not valid JSON "
                                                          r".*--resume_from_checkpoint=checkpoint-1"):
        run_main(fast_args(tmp_path, "--max_train_steps=3", "--resume_from_checkpoint=latest"))
    record.unlink()  # the suite's strict-JSON check reads every .json a test leaves


# ---------------------------------------------------------------------------------------------
# 2. Hangs: a dripping reward server, a stuck rank, an orphaned worker
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dripping_server():
    """Answers 200 with its headers at once, then one byte of the body every 0.5 s (for 30 s)."""

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self):  # the http.server API name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "60")
            self.end_headers()
            for _ in range(60):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return  # the client gave up
                time.sleep(0.5)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/score"
    server.shutdown()
    server.server_close()


def test_a_dripping_reward_server_stops_training_within_the_reward_timeout(tmp_path, dripping_server, caplog,
                                                                          monkeypatch):
    from pipelines.rewards import RemoteReward

    calls = []

    def counted(self, *args, original=RemoteReward.__call__):
        calls.append(self.url)
        return original(self, *args)

    monkeypatch.setattr(RemoteReward, "__call__", counted)
    # The server never finishes an answer, so returning at all is the deadline at work (without it this
    # call would hang); three attempts, each cut off at the whole-request deadline, then the message.
    with caplog.at_level("WARNING", logger="pipelines.rewards.remote"), \
            pytest.raises(RewardError, match=r"too slow after 3 attempts \(deadline 1.5 s per request"):
        run_main(fast_args(tmp_path, f"--reward={dripping_server}", "--reward_timeout=1.5"))
    assert calls == [dripping_server]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "TimeoutError" in retries[0] and "retry 1 of 2 in 1 s" in retries[0], retries


def test_a_rank_stuck_in_its_reward_ends_a_two_process_run_naming_rank_and_step(tmp_path):
    (tmp_path / "stuck.py").write_text(
        "import os, time\n\n\ndef stuck_on_rank_1(images, prompts):\n"
        "    while os.environ.get('RANK') == '1':\n        time.sleep(60)\n"
        "    return images.mean(dim=(1, 2, 3))\n")
    command = [os.path.join(BIN, "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.join(ROOT, "train_drpo.py"),
               *fast_args(tmp_path / "out", f"--reward={tmp_path / 'stuck.py'}:stuck_on_rank_1", "--ddp_timeout=5",
                          "--max_train_steps=2")]
    start = time.time()
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "rank 0 of 2: a collective operation at step 1 failed or did not complete within --ddp_timeout=5 s" \
        in result.stderr, result.stderr[-3000:]
    print(f"stuck rank: the run ended {time.time() - start:.0f} s after launch")


def test_killing_the_launcher_ends_the_worker_and_the_lock_refuses_a_second_writer(tmp_path):
    output = tmp_path / "out"
    launcher = subprocess.Popen(
        [os.path.join(BIN, "accelerate"), "launch", "--cpu", "--num_processes=1", os.path.join(ROOT, "train_drpo.py"),
         *fast_args(output, "--max_train_steps=100000", "--checkpointing_steps=100000")],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "w"), start_new_session=True)  # noqa: SIM115 - the child holds it
    try:
        holder = output / checkpoints.HOLDER_FILE  # written once the lock is held
        worker = int(wait_for(lambda: holder.is_file() and holder.read_text().strip(), 120, "the worker's lock"))
        assert worker != launcher.pid
        with pytest.raises(ValueError, match=f"is being written by another run \\(process {worker}\\)"):
            run_main(fast_args(output, "--resume_from_checkpoint=latest"), load_pipeline=no_model_loading)
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on
        launcher.wait()
        start = time.time()
        wait_for(lambda: process_gone(worker), 120, "the orphaned worker's end")  # a hang guard, not a speed check
        print(f"worker ended {time.time() - start:.1f} s after its launcher")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # whatever is left of the launcher's session


# ---------------------------------------------------------------------------------------------
# 3. Bad input caught before the model loads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ('{"prompt": null}', "the prompt must be a non-empty string, got None"),
    ('{"prompt": 7}', "the prompt must be a non-empty string, got 7"),
    ('{"prompt": "  "}', "the prompt must be a non-empty string"),
    ('{"caption": "a red circle"}', "no 'prompt' key"),
    ('{"prompt": "a red', "not valid JSON"),
])
def test_a_bad_jsonl_prompt_is_named_by_file_and_line_before_the_model_loads(tmp_path, tmp_path_factory, line,
                                                                            message):
    prompts = tmp_path_factory.mktemp("inputs") / "prompts.jsonl"  # not in tmp_path, whose JSON must all parse
    prompts.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a blue square"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl, line 4: {message}"):
        run_main(fast_args(tmp_path / "out", f"--prompts_file={prompts}"), load_pipeline=no_model_loading)


def make_read_only(folder) -> bool:
    """chmod 555; for root (who writes anyway) the immutable attribute. False: this machine cannot."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return True
    return subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True).returncode == 0


def test_a_read_only_output_dir_is_refused_before_the_model_loads(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    if not make_read_only(output):
        pytest.skip("cannot make a folder read-only here")
    try:
        with pytest.raises(ValueError, match="--output_dir .*out' is not writable"):
            run_main(fast_args(output), load_pipeline=no_model_loading)
    finally:
        subprocess.run(["chattr", "-i", str(output)], check=False, capture_output=True)
        output.chmod(0o755)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_from_accelerates_configuration_is_refused_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(ValueError, match="fp16 mixed precision .*needs a GPU"):
        run_main(fast_args(tmp_path), load_pipeline=no_model_loading)


def test_a_feature_path_is_checked_before_the_model_loads(tmp_path):
    not_a_model = tmp_path / "weights.safetensors"
    not_a_model.write_text("not a model")
    with pytest.raises(OSError, match=f"--feature_extractor_path '{not_a_model}' is not a latent_mae model"):
        run_main(fast_args(tmp_path / "a", "--feature_extractor=latent_mae", f"--feature_extractor_path={not_a_model}"),
                 load_pipeline=no_model_loading)
    with pytest.raises(ValueError, match="'image' has no weights to load; remove --feature_extractor_path"):
        run_main(fast_args(tmp_path / "b", f"--feature_extractor_path={not_a_model}"), load_pipeline=no_model_loading)


# ---------------------------------------------------------------------------------------------
# 4. Clear messages and no partial files
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_names_it_keeps_the_previous_and_leaves_no_partial(tmp_path, monkeypatch,
                                                                                          no_final_check):
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def disk_fills_at_step_2(self, output_dir, **kwargs):
        if os.path.basename(output_dir) != "checkpoint-2.tmp":
            return save_state(self, output_dir, **kwargs)
        os.makedirs(output_dir, exist_ok=True)
        (tmp_path / "checkpoint-2.tmp" / "optimizer.bin").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 931") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", disk_fills_at_step_2)
    with pytest.raises(checkpoints.CheckpointError, match=r"could not write checkpoint-2: the disk is full\. The "
                                                          r"partial checkpoint was removed; .*checkpoint-1 is intact"):
        run_main(fast_args(tmp_path, "--max_train_steps=2"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    checkpoints.verify_checkpoint(str(tmp_path / "checkpoint-1"), checkpoints.read_run(str(tmp_path / "checkpoint-1")))


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 64 MB tmpfs (skipped, with the reason, where mounting is refused)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_a_real_write_fault_after_a_checkpoint_names_the_file_and_the_intact_checkpoint(small_filesystem, monkeypatch,
                                                                                        no_final_check, fault):
    """After checkpoint-1, the filesystem really fills up (a file takes all but 64 kB) or the run's folder
    becomes read-only (bound read-only over itself; chmod does not stop root): the run ends naming the cause,
    the file and checkpoint-1, which is whole; no staging is left."""
    output = small_filesystem / "run"
    prune = checkpoints.prune_checkpoints

    def fault_after_the_first_checkpoint(output_dir, limit):
        prune(output_dir, limit)
        if fault == "read-only" and not os.path.ismount(output):  # the run's folder, bound read-only over itself
            subprocess.run(["mount", "--bind", str(output), str(output)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(output)], check=True)
        elif fault == "disk full" and not (small_filesystem / "filler").exists():
            free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
            (small_filesystem / "filler").write_bytes(b"\0" * (free - 64 * 1024))

    monkeypatch.setattr(checkpoints, "prune_checkpoints", fault_after_the_first_checkpoint)
    cause = {"disk full": "the disk is full", "read-only": "the file system is read-only"}[fault]
    with pytest.raises(checkpoints.CheckpointError, match=rf"could not write .*: {cause}.*checkpoint-1 is intact"):
        run_main(fast_args(output, "--max_train_steps=3"))
    if fault == "read-only":
        subprocess.run(["umount", str(output)], check=True)
    leftovers = [p.name for p in output.iterdir() if p.name.endswith((".tmp", checkpoints.STAGING))]
    assert leftovers == [] and (output / "checkpoint-1").is_dir()
    checkpoints.verify_checkpoint(str(output / "checkpoint-1"), checkpoints.read_run(str(output / "checkpoint-1")))


def test_an_output_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "final_metrics.json"
    files.write_json(str(path), {"lora_mean": 1.0})

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_json(str(path), {"lora_mean": 2.0})
    assert json.loads(path.read_text()) == {"lora_mean": 1.0} and os.listdir(tmp_path) == ["final_metrics.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(files.FILE_MODE)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    output = tmp_path_factory.mktemp("two_checkpoints")
    argv = fast_args(output, "--max_train_steps=2")
    original, report.finish_training = report.finish_training, lambda *args, **kwargs: {}
    try:
        run_main(argv)
    finally:
        report.finish_training = original
    return output, argv


@pytest.mark.parametrize("damage,message", [
    ("truncate optimizer.bin", "checkpoint-2 is corrupted: optimizer.bin does not match its checksum"),
    ("delete pytorch_lora_weights.safetensors", "checkpoint-2 is incomplete: pytorch_lora_weights.safetensors"),
    ("flip pytorch_lora_weights.safetensors", "checkpoint-2 is corrupted: pytorch_lora_weights.safetensors does not"),
])
def test_a_damaged_checkpoint_is_named_with_its_file_and_the_previous_one_suggested(two_checkpoints, tmp_path, damage,
                                                                                   message):
    import shutil

    source, _ = two_checkpoints
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    action, name = damage.split()
    target = tmp_path / "checkpoint-2" / name
    data = target.read_bytes()
    if action == "delete":
        target.unlink()
    else:
        flipped = data[:-8] + bytes(b ^ 255 for b in data[-8:])  # same size, other bytes
        target.write_bytes(data[: len(data) // 2] if action == "truncate" else flipped)
    record = checkpoints.read_run(str(tmp_path / "checkpoint-1"))
    with pytest.raises(checkpoints.CheckpointError, match=f"{message}.*--resume_from_checkpoint=checkpoint-1"):
        checkpoints.verify_checkpoint(str(tmp_path / "checkpoint-2"), record)


def test_a_damaged_checkpoint_without_checksums_is_named_at_resume(two_checkpoints, tmp_path):
    """Checkpoints written before checksums existed: the file that fails to load is named."""
    import shutil

    source, argv = two_checkpoints
    output = tmp_path / "out"
    shutil.copytree(source, output)
    (output / "checkpoint-2" / checkpoints.CHECKSUM_FILE).unlink()
    scheduler = output / "checkpoint-2" / "scheduler.bin"
    scheduler.write_bytes(scheduler.read_bytes()[:100])
    argv = [a.replace(str(source), str(output)) for a in argv]
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-2 could not be loaded: scheduler.bin is missing "
                                                          r"or damaged .*--resume_from_checkpoint=checkpoint-1"):
        run_main([*argv, "--max_train_steps=3", "--resume_from_checkpoint=latest"])


def test_a_failed_write_is_reported_as_a_full_disk_only_when_it_is_one():
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 931")
    assert checkpoints.write_failure(torch_zip) == ("the disk is full", None)
    assert checkpoints.write_failure(OSError(errno.ENOSPC, "full", "/out/f")) == ("the disk is full", "/out/f")
    assert checkpoints.write_failure(PermissionError(errno.EACCES, "denied", "/out")) == ("permission denied", "/out")
    assert checkpoints.write_failure(ValueError("a bug, not a write")) is None


# ---------------------------------------------------------------------------------------------
# 5. The reward server's limits
# ---------------------------------------------------------------------------------------------


def blank_png(size: int) -> str:
    return encode_png(torch.zeros(3, size, size))


def post(port: int, payload: dict | bytes, timeout: float = 60) -> tuple[int, str]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def server(monkeypatch):
    """A server in this process whose decoder counts its calls."""
    from pipelines.rewards import server as server_module

    decoded, servers = [], []
    original = server_module.open_png
    monkeypatch.setattr(server_module, "open_png", lambda *args: decoded.append(1) or original(*args))

    def start(**caps):
        instance = server_module.build_server(f"{REWARDS}:brightness", port=0, **caps)
        threading.Thread(target=instance.serve_forever, daemon=True).start()
        servers.append(instance)
        return instance.server_port

    yield start, decoded
    for instance in servers:
        instance.shutdown()
        instance.server_close()


def test_the_server_refuses_a_batch_over_its_pixel_cap_before_decoding_it(server):
    start, decoded = server
    port = start(max_request_pixels=4 * 64 * 64)
    status, answer = post(port, {"prompts": ["p"] * 5, "images": [blank_png(64)] * 5})
    assert status == 413 and "20480 pixels, more than --max_request_pixels=16384" in answer and decoded == []
    status, answer = post(port, {"prompts": ["p"] * 4, "images": [blank_png(64)] * 4})
    assert status == 200 and len(json.loads(answer)["scores"]) == 4 and len(decoded) == 4


def test_the_server_rejects_prompts_that_are_not_strings(server):
    start, decoded = server
    port = start()
    for prompts in ([None], [3], [["a"]]):
        status, answer = post(port, {"prompts": prompts, "images": [blank_png(8)]})
        assert (status, json.loads(answer)["error"]) == (400, "every prompt must be a string") and decoded == []


def test_an_oversized_request_reaches_the_client_as_413_not_a_broken_pipe(server, caplog):
    from pipelines.rewards import RemoteReward

    start, _ = server
    port = start(max_request_mb=3)  # the body below: ~8.5 MB, more than the loopback socket buffers hold
    noise = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="pipelines.rewards.remote"), \
            pytest.raises(RewardError, match=r"HTTP 413: .*request body must be 1..3145728 bytes \(--max_request_mb\)"):
        RemoteReward(f"http://127.0.0.1:{port}/score", backoff=0.01)(noise, ["p", "p"])
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # sent once: no re-send of the body


def peak_resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1]) * 1024


def test_the_server_peak_memory_is_bounded_by_its_caps_whatever_clients_send(tmp_path):
    """64 blank 2048x2048 PNGs (~0.4 MB, under every byte cap; 3.2 GB once decoded) are refused from
    their headers, and concurrent requests at the pixel cap are decoded one batch at a time: the
    server's peak grows by less than 3 x 12 bytes x --max_request_pixels (images, their clamped copy
    for the reward, one image being decoded)."""
    cap = 2048 * 2048
    server = subprocess.Popen([sys.executable, "-m", "pipelines.rewards.server", f"--reward={REWARDS}:brightness",
                               "--port=0", f"--max_request_pixels={cap}"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        assert post(port, {"prompts": ["p"], "images": [blank_png(64)]})[0] == 200  # warm: imports, first batch
        baseline = peak_resident_bytes(server.pid)
        big = blank_png(2048)
        status, answer = post(port, {"prompts": ["p"] * 64, "images": [big] * 64})
        assert status == 413 and f"more than --max_request_pixels={cap}" in answer
        answers = [None] * 4
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, post(port, {"prompts": ["p"],
                                                                                           "images": [big]})))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in answers] == [200] * 4
        growth = peak_resident_bytes(server.pid) - baseline
        print(f"server peak grew by {growth / 2**20:.0f} MB (bound {3 * 12 * cap / 2**20:.0f} MB)")
        assert growth < 3 * 12 * cap, growth
    finally:
        server.terminate()
        server.wait()
