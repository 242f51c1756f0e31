"""vLLM ``general_plugins`` entry point: makes ``--attention-backend razor`` available."""


def register() -> None:
    """Called by vLLM in every process it starts (API server, engine core, workers)."""
    from razor_vllm import vllm_compat

    vllm_compat.install()
