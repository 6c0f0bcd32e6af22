"""The first requests for a version the server has not loaded yet, all at once (a release or rollback under load):
the version loads once and every request is answered. Before, two loads ran side by side in the server's threads and
left this and every later model of the process with meta tensors: each chat request was a 500 until a restart."""

import threading
from concurrent.futures import ThreadPoolExecutor

from policies import openai_api
from policies.lm.chat import register_causal_lm
from policies.lm.decoding import Sampling
from proxyloop.testing import isolated_settings
from workers.lm.models import build_tiny

NAME = "cold-load"  # served models are cached by (name, version) process-wide: a name of this module's own
THREADS = 4


def test_concurrent_first_requests_load_the_version_once_and_all_generate(tmp_path):
    settings = isolated_settings(tmp_path, registry_url=str(tmp_path / "registry"))
    register_causal_lm(settings.registry_dir, NAME, build_tiny(tmp_path / "tiny", seed=0), {"seed": 0})
    start = threading.Barrier(THREADS)

    def first_request(_: int) -> tuple[int, str]:
        start.wait()
        policy = openai_api.chat_policy(settings, NAME)
        pieces = policy.generate([{"role": "user", "content": "hi"}], Sampling(max_tokens=3, temperature=0))
        return id(policy), "".join(piece.text for piece in pieces)

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(first_request, range(THREADS)))
    assert len({policy for policy, _ in answers}) == 1  # loaded once, shared
    assert len({text for _, text in answers}) == 1  # greedy: the same reply for every request
    (policy,) = [p for key, p in openai_api._cache.items() if key[0] == NAME]
    assert not any(parameter.is_meta for parameter in policy.model.parameters())
