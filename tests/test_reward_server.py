"""The reward server as a user runs it (uvicorn in a subprocess, loopback): clients that vanish, drip or
crowd it, every documented limit, /health and /info, the trainer's start-up probe (Issue 24)."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT
from test_reliability import blank_png, peak_resident_bytes

from pipelines.rewards import RewardError, probe_servers
from pipelines.rewards.remote import RemoteReward, probe_server

REWARDS = os.path.join(os.path.dirname(__file__), "data", "rewards.py")


@pytest.fixture(scope="module")
def server():
    """One server for the module: 2 s to send a request, 1 MB bodies, 8 images of at most 512^2."""
    process = subprocess.Popen([sys.executable, "-m", "pipelines.rewards.server", f"--reward={REWARDS}:brightness",
                                "--port=0", "--request_timeout=2", "--max_request_mb=1", "--max_batch=8",
                                f"--max_image_pixels={512 * 512}", "--token=s3cret"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        port = int(process.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        yield port, process.pid
    finally:
        process.terminate()
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn stops gracefully, then re-raises the signal
        process.stdout.close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            token: str | None = "s3cret", timeout: float = 30) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def score_body(count: int = 2, size: int = 8) -> bytes:
    return json.dumps({"prompts": ["p"] * count, "images": [blank_png(size)] * count}).encode()


def raw_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_health_and_info_answer_with_the_token_only(server):
    port, _ = server
    assert request(port, "GET", "/health") == (200, {"status": "ok", "reward": f"{REWARDS}:brightness"})
    status, info = request(port, "GET", "/info")
    assert status == 200 and info["limits"]["max_batch"] == 8 and info["limits"]["max_image_pixels"] == 512 * 512
    assert info["protocol_version"] == "2" and info["workers"] == 1
    assert request(port, "GET", "/health", token="wrong")[0] == 401
    probe_server(f"http://127.0.0.1:{port}/score", token="s3cret")  # the trainer's start-up check
    with pytest.raises(ValueError, match="refused the token: set \\$DRPO_REWARD_TOKEN"):
        probe_server(f"http://127.0.0.1:{port}/score", token="wrong")


def test_protocol_edges_get_their_own_status(server):
    port, _ = server
    empty = json.dumps({"prompts": [], "images": []}).encode()
    assert request(port, "POST", "/score", empty)[0] == 400
    status, answer = request(port, "POST", "/score", score_body(9))
    assert status == 413 and "1..8 images" in answer["error"]
    status, answer = request(port, "POST", "/score", score_body(1, 4096))  # under the byte cap, over 512^2
    assert status == 413 and "more than --max_image_pixels=262144" in answer["error"]
    with raw_socket(port) as client:  # neither Content-Length nor chunked
        client.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 411")


def test_a_chunked_body_is_scored_and_an_endless_one_is_cut_at_the_byte_cap(server):
    port, _ = server
    body = score_body(3, 16)

    def chunked(parts) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"

    for payload, expected in ((chunked([body[:100], body[100:]]), b"200"), (chunked([b"x" * 2**19] * 3), b"413")):
        with raw_socket(port) as client:
            client.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + payload)
            assert client.recv(100).split()[1] == expected


def test_vanishing_clients_leave_the_server_answering(server):
    """25 clients that go away (half a body, a full body unread, mid-scoring), then a normal request in < 5 s."""
    port, _ = server
    body = score_body(8, 256)
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    for index in range(25):
        client = raw_socket(port)
        client.sendall(head + (body[:len(body) // 2] if index % 2 else body))
        client.close()
    assert request(port, "POST", "/score", score_body(), timeout=5)[0] == 200  # answered within 5 s


def test_a_dripping_client_is_cut_off_at_the_deadline_while_others_are_served(server):
    port, _ = server
    body = score_body()
    client = raw_socket(port)
    client.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: %d\r\n\r\n"
                   % len(body))
    served = []
    answer = b""
    client.settimeout(0.2)
    for byte in body:  # one byte every 0.2 s: the whole body would take 20x the 2 s deadline
        with contextlib.suppress(OSError):  # the server may have closed its side already
            client.sendall(bytes([byte]))
        with contextlib.suppress(socket.timeout):
            answer += client.recv(1000)
        if answer:
            break
        if not served:  # another client, meanwhile
            served.append(request(port, "POST", "/score", score_body())[0])
    client.settimeout(10)  # the headers may come before the body: read the answer to its end
    with contextlib.suppress(OSError):
        while chunk := client.recv(1000):
            answer += chunk
    client.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"within 2 s" in answer, answer
    assert served == [200]


def test_sixty_four_concurrent_clients_are_all_scored(server):
    port, pid = server
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    client = RemoteReward(f"http://127.0.0.1:{port}/score", token="s3cret")
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: client(images, ["p"] * 4), range(64)))
    assert all(answer == answers[0] for answer in answers) and len(answers[0]) == 4
    print(f"server peak after 64 concurrent clients: {peak_resident_bytes(pid) / 2**20:.0f} MB")


def test_the_trainer_checks_the_server_before_loading_anything(server, monkeypatch, tmp_path):
    """The flags' check (parse_args, before any model loads) probes each reward URL's /health."""
    import train_drpo
    from test_train_inputs import args_for

    port, _ = server
    monkeypatch.setenv("DRPO_REWARD_TOKEN", "wrong")
    with pytest.raises(ValueError, match="refused the token"):
        train_drpo.parse_args(args_for(tmp_path, f"--reward=http://127.0.0.1:{port}/score"))
    monkeypatch.setenv("DRPO_REWARD_TOKEN", "s3cret")
    train_drpo.parse_args(args_for(tmp_path, f"--reward=http://127.0.0.1:{port}/score"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(ValueError, match=f"reward server http://127.0.0.1:{free}/score\\?api_key=\\*\\*\\* is not "
                                         "reachable"):
        probe_servers(f"http://127.0.0.1:{free}/score?api_key=planted-key")
    with pytest.raises(RewardError, match="HTTP 401") as caught:
        RemoteReward(f"http://127.0.0.1:{port}/score?api_key=planted-key", token="wrong", retries=0)(
            torch.rand(1, 3, 8, 8), ["p"])
    assert "planted-key" not in str(caught.value)


def test_a_key_in_a_reward_or_metric_url_is_written_nowhere(server, tmp_path, capfd, monkeypatch):
    """A key planted in the reward URL, a validation-reward URL and two metric URLs (named and not) is in no
    file a run or an evaluation writes (the files --push_to_hub uploads among them: the output folder), in
    no tracker event and on neither console stream; the masked URL is there instead. Every file has the
    usual permissions."""
    from test_train import TINY_SD, train, training_args

    from pipelines import evaluate, files

    port, _ = server
    monkeypatch.setenv("DRPO_REWARD_TOKEN", "s3cret")
    url = f"http://user:planted-password@127.0.0.1:{port}/score?api_key=planted-key&model=v1"
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "run", f"--reward={url}", "--max_train_steps=2",
                                          "--validation_steps=1", f"--validation_rewards={url}",
                                          "--report_to=tensorboard", "--checkpointing_steps=1"))
    evaluate.main([f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={tmp_path / 'run'}",
                   f"--prompts_file={os.path.join(ROOT, 'assets', 'tiny_prompts.txt')}", "--max_prompts=2",
                   "--seeds=0-1", f"--metrics=named={url},{url}", f"--output_dir={tmp_path / 'eval'}"])
    console = capfd.readouterr()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 20
    for path in written:
        data = path.read_bytes()
        assert b"planted" not in data, path.relative_to(tmp_path)
    assert "planted" not in console.out and "planted" not in console.err
    modes = {path.relative_to(tmp_path).as_posix(): oct(path.stat().st_mode & 0o777) for path in written}
    assert set(modes.values()) == {oct(files.FILE_MODE)}, modes  # the usual permissions, LoRA files included
    assert "api_key=***" in (tmp_path / "run" / "README.md").read_text()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["metric_specs"].values()) == {f"http://***@127.0.0.1:{port}/score?api_key=***&model=v1"}


def test_ray_serve_replicas_score_like_the_local_reward_and_batch_requests_from_several_clients(tmp_path):
    """Two CPU replicas on a local Ray instance: the scores are the local reward's (of the 8-bit PNGs), and
    requests sent together are scored in shared reward calls (the replicas' batch log)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is the optional ray[serve] install (requirements.txt has it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "batches.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "pipelines.rewards.ray_serve", f"--reward={REWARDS}:brightness",
                                "--num_replicas=2", f"--port={port}", "--batch_wait_s=1", f"--batch_log={log}"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "DRPO_REWARD_TOKEN": ""})
    try:
        assert "2 Ray Serve replica(s)" in process.stdout.readline()  # printed once the application is ready
        probe_server(f"http://127.0.0.1:{port}/score", token="")
        images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        client = RemoteReward(f"http://127.0.0.1:{port}/score", token="")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client(images, ["p"] * 3), range(8)))
        local = ((images * 255).round() / 255).mean((1, 2, 3)).double()
        for answer in answers:
            torch.testing.assert_close(torch.tensor(answer, dtype=torch.float64), local, rtol=1e-5, atol=1e-6)
        batches = [json.loads(line) for line in log.read_text().splitlines()]
        assert sum(batch["requests"] for batch in batches) == 8 and max(batch["requests"] for batch in batches) >= 2
        assert all(batch["images"] == 3 * batch["requests"] for batch in batches)
    finally:
        process.terminate()
        process.wait(60)
        process.stdout.close()
