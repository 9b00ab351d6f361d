"""The original LLaVA conversation formats as Jinja chat templates, for exported checkpoints.

An engine that serves an export (vLLM's OpenAI server, for example) formats conversations with the
checkpoint's chat template; with these, it renders the same text as ``prompts.py`` does (tests
compare the two), so a served model sees the prompts it was trained with. Messages are the
transformers kind: ``content`` a string or a list of ``{"type": "text"|"image", ...}`` parts; a
message with an image part gets the ``<image>`` placeholder first, as the original puts it.
"""

from __future__ import annotations

from .prompts import CHATML_SYSTEM, LLAMA_2_SYSTEM, LLAVA_V1_SYSTEM

# Shared pieces: the text of a message, whether it carries an image, and the system prompt.
_PRELUDE = """\
{%- macro text_of(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro body(message) -%}
{%- if message['content'] is not string and message['content'] | selectattr('type', 'equalto', 'image') | list -%}
{{ '<image>\\n' }}{%- endif -%}{{ text_of(message) }}
{%- endmacro -%}
{%- set ns = namespace(system=DEFAULT_SYSTEM) -%}
{%- for message in messages if message['role'] == 'system' -%}{%- set ns.system = text_of(message) -%}{%- endfor -%}
"""

_LLAVA_V1 = """\
{{- ns.system + ' ' -}}
{%- for message in messages if message['role'] != 'system' -%}
{%- if message['role'] == 'user' -%}{{ 'USER: ' + body(message) + ' ' }}
{%- else -%}{{ 'ASSISTANT: ' + body(message) + '</s>' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""

_LLAMA_2 = """\
{%- for message in messages if message['role'] != 'system' -%}
{%- set content = body(message) -%}
{%- if loop.first and ns.system -%}{%- set content = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}
{%- if message['role'] == 'user' -%}{{ (SEP if not loop.first else '') + '[INST] ' + content + ' [/INST]' }}
{%- else -%}{{ ' ' + content + ' </s>' }}{%- endif -%}
{%- endfor -%}
"""

_CHATML = """\
{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>' -}}
{%- for message in messages if message['role'] != 'system' -%}
{{ '<|im_start|>' + message['role'] + '\\n' + body(message) + '<|im_end|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""


def _with(template: str, **constants: str) -> str:
    """The template with its constants set at the top (Jinja string literals)."""
    import json

    settings = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}\n" for name, value in constants.items())
    return settings + _PRELUDE + template


CHAT_TEMPLATES = {
    "llava_v1": _with(_LLAVA_V1, DEFAULT_SYSTEM=LLAVA_V1_SYSTEM),
    "mistral_instruct": _with(_LLAMA_2, DEFAULT_SYSTEM="", SEP=""),
    "llava_llama_2": _with(_LLAMA_2, DEFAULT_SYSTEM=LLAMA_2_SYSTEM, SEP="<s>"),
    "chatml_direct": _with(_CHATML, DEFAULT_SYSTEM=CHATML_SYSTEM),
}
