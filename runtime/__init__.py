"""fuselm: a custom-kernel accelerated runtime for GPT-style language models.

    import fuselm
    m = fuselm.load("smollm2-135m-instruct")
    print(m.generate("The capital of France is", max_new_tokens=32))

`fuselm.ops` holds the kernels behind one dispatch point per op.
"""
from . import ops
from .ops import set_backend

__version__ = "0.1.0"


def load(source, dtype=None, device=None, backend="auto", quant="keep", quantize=None, progress=True, tp=1):
    """Load a model: a Hugging Face directory, a .gguf file, or a built-in name.

    quant="keep" (default) keeps GGUF block-quantized weights quantized where the device has
    quantized matmuls (the CPU's native kernels, Triton's on CUDA), "dequantize" converts them to dense `dtype`.
    quantize="q8_0" | "q4_0" | "q4_1" quantizes dense weights (safetensors) at load.
    progress=False hides the loading progress bar and the size summary.
    tp=N shards the model over N processes (tensor parallelism, fuselm.tp): this one is rank 0, the
    others are started here, or by torchrun, where every rank calls load and only rank 0 returns.
    """
    from .model import Model
    return Model.load(source, dtype=dtype, device=device, backend=backend, quant=quant, quantize=quantize,
                      progress=progress, tp=tp)


def __getattr__(name):
    # Model is imported lazily so `import fuselm` stays cheap.
    if name == "Model":
        from .model import Model
        return Model
    if name in ("Engine", "SamplingParams", "Completion", "FinishReason"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'fuselm' has no attribute {name!r}")


__all__ = ["load", "Model", "Engine", "SamplingParams", "Completion", "FinishReason", "ops", "set_backend"]
