"""(c) on a GPU: the engine's continuous batching against sequential `model.generate`, and the
decode rate as a fraction of the card's memory bandwidth (the weights are read once per step).

The model is built on the spot with SmolLM2-135M's shape (random weights: the GPU machine has
no hub), with a byte-level tokenizer trained in a second on a small text; both engines run the
same requests on the same weights in the same run.

    bench/gpu.sh                              on the GPU machine
    python -m bench.gpu --device cpu --layers 2   a smoke run anywhere
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

CONCURRENCY = [1, 2, 4, 8, 16]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [f"The {w} of {n} is a plain sentence about number {n}." for n in range(500) for w in ("sum", "name", "map")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    return fast


def _model(tokenizer, layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's shape; the vocabulary is the trained tokenizer's (the real one has 49152 entries).
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _copy_bandwidth(device: torch.device) -> float:
    """What the card really moves, bytes/s (read + write), from device-to-device copies."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 20 / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    from cortex.protocol.messages import DeviceInfo, InferenceJob, ModelSpec, SamplingParams
    from neuron.engine.chat import ChatFormat
    from neuron.engine.outputs import Finished, Text
    from neuron.engine.runtime import LoadedModel
    from neuron.engine.sampling import SamplingDefaults
    from neuron.engine.transformers_runtime import TransformersRuntime
    from neuron.engine.worker import DeviceWorker

    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = _tokenizer()
    model = _model(tok, args.layers, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = ModelSpec(id="smollm2-shape", source="file:/dev/null")
    loaded = LoadedModel(
        spec=spec,
        runtime=TransformersRuntime(model, max_batch=max(CONCURRENCY)),
        tokenizer=tok,
        device=device,
        context=4096,
        eos_ids=frozenset({tok.eos_token_id}),
        memory_mb=weight_bytes // 2**20,
        sampling=SamplingDefaults(),
        chat=ChatFormat(spec, tok),
        vocab_size=model.config.vocab_size,
    )
    prompts = [f"The sum of {n} is a plain sentence about number {n}." * 3 for n in range(max(CONCURRENCY))]
    no_eos = {tok.eos_token_id: -100.0}

    def job(i: int) -> InferenceJob:
        sampling = SamplingParams(max_tokens=args.tokens, temperature=0.0, logit_bias=no_eos)
        return InferenceJob(job_id=f"j{i}", request_id="bench", model=spec.id, prompt=prompts[i], sampling=sampling)

    info = DeviceInfo(id=str(device), kind=device.type, name=str(device), total_mb=1, free_mb=1)  # type: ignore[arg-type]
    worker = DeviceWorker(info, max_batch=max(CONCURRENCY))
    worker.start()

    async def one(handle) -> tuple[float | None, int]:
        started, first, tokens = time.perf_counter(), None, 0
        async for out in handle.outputs():
            if isinstance(out, Text) and first is None:
                first = time.perf_counter() - started
            if isinstance(out, Finished):
                tokens = out.completion_tokens
        return first, tokens

    async def sweep(c: int) -> tuple[float, float]:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(worker.start_job(job(i), loaded)) for i in range(c)))
        wall = time.perf_counter() - started
        return sum(t for _, t in results) / wall, statistics.median(f for f, _ in results if f is not None)

    asyncio.run(sweep(2))  # warm-up
    ours = {c: asyncio.run(sweep(c)) for c in CONCURRENCY}
    worker.stop()

    with torch.inference_mode():
        ids = tok(prompts[0], return_tensors="pt").to(device)
        model.generate(**ids, max_new_tokens=8, do_sample=False)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for i in range(4):
            ids = tok(prompts[i], return_tensors="pt").to(device)
            model.generate(
                **ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0
            )
        _sync(device)
        sequential = 4 * args.tokens / (time.perf_counter() - started)

    bandwidth = _copy_bandwidth(device) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: {args.layers}-layer SmolLM2-shaped model, {dtype}, {weight_bytes / 1e6:.0f} MB of weights")
    if bandwidth:
        print(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; one decode step reads the weights once")
    print()
    print("| concurrency | tok/s | TTFT p50 ms | sequential generate tok/s | ratio | weight reads / bandwidth |")
    print("|---|---|---|---|---|---|")
    for c in CONCURRENCY:
        rate, ttft = ours[c]
        steps = rate / c  # each step gives one token to every stream
        fraction = f"{steps * weight_bytes / bandwidth:.1%}" if bandwidth else "-"
        print(f"| {c} | {rate:.0f} | {ttft * 1000:.1f} | {sequential:.0f} | {rate / sequential:.2f}x | {fraction} |")
    if bandwidth:
        print(f"\nsequential generate: {sequential * weight_bytes / bandwidth:.1%} of the bandwidth limit")


if __name__ == "__main__":
    main()
