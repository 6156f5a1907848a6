"""The OpenAI-compatible chat API, driven by the official `openai` client,
against an instance placed over two real daemons: greedy answers are
exactly the single-process model's, streamed or not, from either node."""

import asyncio

import openai
import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings, started, statuses, until
from .test_instances import call, instance_in

GB = 10**9
MESSAGES = [{"role": "user", "content": "hello world, what is a token?"}]


def single_process_answer(model_dir, max_tokens):
    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, sampler=make_sampler(0.0))


def test_openai_client_gets_the_single_process_answer(tmp_path):
    async def scenario():
        # Too small for the demo model alone: the pipeline must span both nodes.
        a = await started(settings(tmp_path, "a", memory_limit=160 * 10**6, prestart_runner=True))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=160 * 10**6,
                                   prestart_runner=True))
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            body = {"model": "demo", "strategy": "pipeline", "nodes": ["a", "b"], "context_length": 256}
            status, placed = await asyncio.to_thread(call, "POST", f"http://127.0.0.1:{a.api_port}/v1/instances", body)
            assert status == 201, placed
            iid = placed["instance_id"]
            assert {r["node_name"] for r in placed["placement"]["ranks"]} == {"a", "b"}
            await until(lambda: all((i := instance_in(n, iid)) is not None and i.state == pb.INSTANCE_READY
                                    for n in (a, b)), 120)
            expected = await asyncio.to_thread(single_process_answer, a.models_dir / "demo", 24)
            assert expected

            for node in (a, b):  # through either node
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{node.api_port}/v1", api_key="unused")
                models = await asyncio.to_thread(client.models.list)
                assert [m.id for m in models.data] == ["demo"]
                answer = await asyncio.to_thread(client.chat.completions.create, model="demo", messages=MESSAGES,
                                                 temperature=0, max_tokens=24)
                assert answer.choices[0].message.content == expected
                assert answer.usage.prompt_tokens == 12 and answer.usage.completion_tokens <= 24

                def streamed():
                    parts, finish = [], None
                    for event in client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0,
                                                                max_tokens=24, stream=True):
                        if event.choices:
                            parts.append(event.choices[0].delta.content or "")
                            finish = event.choices[0].finish_reason or finish
                    return "".join(parts), finish
                text, finish = await asyncio.to_thread(streamed)
                assert text == expected and finish in ("stop", "length")

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{b.api_port}/v1", api_key="unused")
            seeded = [await asyncio.to_thread(client.chat.completions.create, model="demo", messages=MESSAGES,
                                              temperature=1.0, seed=7, max_tokens=12, logprobs=True,
                                              top_logprobs=2) for _ in range(2)]
            assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
            first = seeded[0].choices[0].logprobs.content[0]
            assert first.logprob <= 0 and len(first.top_logprobs) == 2

            with pytest.raises(openai.NotFoundError):
                await asyncio.to_thread(client.chat.completions.create, model="nope", messages=MESSAGES)
            with pytest.raises(openai.BadRequestError) as bad:
                await asyncio.to_thread(client.chat.completions.create, model="demo", messages=[{"role": "x"}])
            assert "messages[0]" in str(bad.value)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
