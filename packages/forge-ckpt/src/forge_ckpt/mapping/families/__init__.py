"""Built-in family mappings, each a module defining ``MAPPING`` (imported on first use)."""

#: Registry name -> module defining ``MAPPING``.
BUILTIN_MAPPINGS = {
    "llama": "forge_ckpt.mapping.families.llama",
    "qwen2": "forge_ckpt.mapping.families.qwen2",
    "qwen3": "forge_ckpt.mapping.families.qwen3",
    "qwen2_moe": "forge_ckpt.mapping.families.qwen2_moe",
    "qwen3_moe": "forge_ckpt.mapping.families.qwen3_moe",
    "deepseek_v3": "forge_ckpt.mapping.families.deepseek_v3",
}
