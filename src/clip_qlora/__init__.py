"""clip-qlora: what 4-bit QLoRA buys over LoRA when adapting CLIP, as a DVC pipeline (see README.md)."""
import logging


class _NoHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch an optional faster CPU kernel from the
    Hugging Face hub (through the `kernels` package, which we do not install, and offline besides) and logs a
    warning with the exception when it cannot; bitsandbytes then uses its built-in CPU kernel, which is what
    the CPU demo and tests measure anyway. Every CPU stage printed it, so it is filtered here: only that
    message, only on the logger that emits it. bitsandbytes is imported by backends.nf4, by PEFT's LoRA layers
    and by io.versions, all inside this package, so the filter is in place before any of them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
