"""Structured extraction over a JSONL file: one JSON object per document, forced by a schema.

Each input line is a JSON object holding a document's text. The model reads each document and
writes a JSON object under constrained decoding (the JSON schema is compiled into a grammar that
masks every token), so every finished output parses and matches the schema. Each output line is:

    {"id": "p1", "output": {...} | null, "valid": true, "error": null,
     "finish_reason": "stop", "completion_tokens": 42}

Usage (from the repository root; the sample files are in examples/data/):

    python examples/extract_json.py --input examples/data/people.jsonl \\
        --schema examples/data/person_schema.json --output people.out.jsonl

    # the schema of a pydantic model: module:Class or path/to/file.py:Class
    python examples/extract_json.py --input docs.jsonl --output out.jsonl \\
        --pydantic my_models.py:Invoice --text-field body --id-field doc_id

    # against a running server (`smallm serve --model-path ...`, or an SGLang server)
    python examples/extract_json.py --input docs.jsonl --output out.jsonl \\
        --schema schema.json --server-url http://127.0.0.1:30000

Options: --instruction "..." (the task sentence put before the schema and the document),
--model-path P (in-process model; default SmolLM2-135M-Instruct), --batch-size 64 (documents
per generate call), --max-new-tokens 256, --temperature 0, --repetition-penalty 1.1,
--max-total-tokens N (KV cache size of the in-process engine).

Documents are sent in batches of --batch-size (the engine batches them continuously) and each
batch's results are appended to --output and flushed, so an interrupted run (Ctrl-C, kill)
loses at most one batch. Rerunning the same command resumes: ids already in --output are
skipped. The id of a document is its --id-field value, else its line number (from 1).

"valid" is true when the output parsed and validated against the schema with `jsonschema`
(optional: without it outputs are validated with the pydantic model, if one was given, or only
parsed). finish_reason "length" means --max-new-tokens ran out inside the JSON (the output is
null); "abort" means the request was refused (the message is in "error"). The exit status is
0 when every document has a line in --output, 2 for a usage or input error, 1 when the model or
server fails, 130 when interrupted; the last line on stdout is a summary.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_INSTRUCTION = (
    "Extract the information in the text below into a JSON object that follows the JSON "
    "schema. Use only facts stated in the text."
)


class UserError(Exception):
    """A problem with the command line, the input or the schema (printed without a traceback)."""


class BackendError(Exception):
    """The model or the server failed; the results written so far are kept."""


class BatchRejected(Exception):
    """The server refused a whole batch (HTTP 400): the documents are retried one by one."""


# ---- input, schema, output -----------------------------------------------------------------


@dataclass
class Doc:
    id: Any
    key: str  # the id as canonical JSON: 1 and "1" are different documents
    text: str | None
    error: str | None = None  # a problem with the input line itself (no model call)


def id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def read_documents(path: Path, text_field: str, id_field: str) -> tuple[list[Doc], int]:
    """The documents of ``path`` in order and the number of repeated ids left out."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    docs: list[Doc] = []
    seen: set[str] = set()
    repeated = 0
    with_text = 0
    first_fields: list[str] | None = None
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    obj, error = None, f"line {lineno} is not valid JSON: {e}"
                else:
                    error = None if isinstance(obj, dict) else f"line {lineno} is not a JSON object"
                if not isinstance(obj, dict):
                    obj = {}
                if first_fields is None and obj:
                    first_fields = sorted(obj)
                doc_id = obj.get(id_field)
                if doc_id is None or isinstance(doc_id, (dict, list)):
                    doc_id = lineno
                text = obj.get(text_field)
                if isinstance(text, str) and text.strip():
                    with_text += 1
                elif error is None:
                    error = f"line {lineno} has no non-empty string field {text_field!r}"
                    text = None
                key = id_key(doc_id)
                if key in seen:
                    repeated += 1
                    warn(f"line {lineno}: id {key} was already used by an earlier line; skipped")
                    continue
                seen.add(key)
                docs.append(Doc(doc_id, key, text if error is None else None, error))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if docs and with_text == 0:
        hint = f" (the first line's fields: {', '.join(first_fields)})" if first_fields else ""
        raise UserError(
            f"no line of {path} has a string field {text_field!r}{hint}; choose the field "
            "with --text-field"
        )
    return docs, repeated


def load_pydantic_model(spec: str) -> Any:
    """The class named by ``module:Class`` or ``path/to/file.py:Class``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"--pydantic takes module:Class or path/to/file.py:Class, got {spec!r}")
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--pydantic: file not found: {path}")
            module_name = f"_extract_schema_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"--pydantic: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # pydantic resolves annotations through it
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--pydantic: cannot import {target}: {type(e).__name__}: {e}") from None
    model = getattr(module, name, None)
    if model is None:
        raise UserError(f"--pydantic: {target} has no attribute {name!r}")
    if not callable(getattr(model, "model_json_schema", None)):
        raise UserError(f"--pydantic: {spec} is not a pydantic (v2) model class")
    return model


def load_schema(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the JSON schema, the pydantic model or None)."""
    if args.pydantic:
        model = load_pydantic_model(args.pydantic)
        try:
            return model.model_json_schema(), model
        except Exception as e:
            raise UserError(f"--pydantic: {args.pydantic} has no JSON schema: {e}") from None
    path = Path(args.schema)
    if not path.is_file():
        raise UserError(f"schema file not found: {path}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"schema file {path} is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"schema file {path} must hold a JSON object (a JSON schema)")
    return schema, None


def make_validator(schema: Any, model: Any) -> Callable[[Any], str | None]:
    """A function returning why an output does not match the schema (None if it does). Checks
    the schema itself first (with jsonschema, when it is installed)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise UserError(
                f"invalid JSON schema: {e.message}" + (f" (at {where})" if where else "")
            ) from None
        checker = getattr(cls, "FORMAT_CHECKER", None) or jsonschema.FormatChecker()
        validator = cls(schema, format_checker=checker)

        def check(obj: Any) -> str | None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
            if error is None:
                return None
            return f"schema violation at {getattr(error, 'json_path', '$')}: {error.message}"

        return check
    if model is not None:
        warn("jsonschema is not installed: outputs are validated with the pydantic model")

        def check_pydantic(obj: Any) -> str | None:
            try:
                model.model_validate(obj)
            except Exception as e:
                return f"schema violation: {e}".splitlines()[0]
            return None

        return check_pydantic
    warn(
        "jsonschema is not installed: outputs are parsed but not validated against the schema "
        "(pip install jsonschema)"
    )
    return lambda obj: None


def read_done(path: Path) -> set[str]:
    """Ids already in the output file. A last line cut off mid-write (the process was killed)
    is removed, so appending continues on a fresh line."""
    done: set[str] = set()
    if not path.exists():
        return done
    if not path.is_file():
        raise UserError(f"--output {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    end = len(data)
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1
        warn(f"{path}: removing an incomplete last line (an interrupted write)")
        with path.open("r+b") as f:
            f.truncate(end)
    bad = 0
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add(id_key(rec["id"]))
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        warn(f"{path}: {bad} unreadable line(s) ignored; those documents are redone")
    return done


# ---- model backends ------------------------------------------------------------------------


class EngineBackend:
    """The model in this process (smallm.Engine)."""

    def __init__(self, model_path: str | None, max_total_tokens: int | None):
        from smallm import Engine  # sets the CPU thread policy before torch loads

        kwargs = {"max_total_tokens": max_total_tokens} if max_total_tokens else {}
        try:
            self.engine = Engine(model_path, **kwargs)
        except Exception as e:
            raise BackendError(f"cannot load the model: {type(e).__name__}: {e}") from None
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[str], params: list[dict]) -> list[dict]:
        try:
            return self.engine.generate(prompts, params)
        except ValueError as e:  # the request builder refused the batch
            raise BatchRejected(str(e)) from None
        except RuntimeError as e:
            raise BackendError(f"the engine failed: {e}") from None

    def interrupt(self) -> None:
        self.engine.abort(abort_all=True)

    def close(self) -> None:
        self.engine.shutdown()


class ServerBackend:
    """A running smallm or SGLang server: POST /generate with batched lists (urllib only)."""

    def __init__(self, url: str, model_path: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.inflight: list[str] = []
        info = self._request("GET", "/get_model_info", None, timeout=30)
        path = model_path or info.get("tokenizer_path") or info.get("model_path")
        self.tokenizer = load_chat_tokenizer(path, explicit=model_path is not None)

    def _request(self, method: str, route: str, body: Any, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + route, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = _http_error_message(e)
                if e.code == 400:
                    raise BatchRejected(detail) from None
                if e.code in (502, 503, 504) and attempt < 2:
                    time.sleep(2 * (attempt + 1))
                    continue
                raise BackendError(f"{method} {self.url}{route}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):  # not retried: the server is still busy
                    raise BackendError(f"{self.url}{route}: no answer in {timeout:.0f} s") from None
                if attempt < 2:
                    time.sleep(2 * (attempt + 1))
                    continue
                raise BackendError(f"cannot reach the server at {self.url}: {reason}") from None
            except TimeoutError:
                raise BackendError(f"{self.url}{route}: no answer in {timeout:.0f} s") from None
            except ValueError as e:
                raise BackendError(f"{self.url}{route}: the reply is not JSON: {e}") from None
        raise AssertionError("unreachable")

    def generate(self, prompts: list[str], params: list[dict]) -> list[dict]:
        rids = [f"extract-{uuid.uuid4().hex}" for _ in prompts]
        self.inflight = rids
        body = {"text": prompts, "sampling_params": params, "rid": rids}
        out = self._request("POST", "/generate", body, timeout=self.timeout)
        self.inflight = []
        if not isinstance(out, list) or len(out) != len(prompts):
            raise BackendError(
                f"/generate returned {type(out).__name__}, not {len(prompts)} results"
            )
        return out

    def interrupt(self) -> None:
        """Free the server from this run's unfinished requests (best effort)."""
        for rid in self.inflight:
            try:
                self._request("POST", "/abort_request", {"rid": rid}, timeout=2)
            except Exception:
                break

    def close(self) -> None:
        pass


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        error = body.get("error", body) if isinstance(body, dict) else body
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except Exception:
        return e.reason or "error"


def load_chat_tokenizer(path: str | None, explicit: bool) -> Any:
    """The tokenizer whose chat template formats prompts for a server (None: plain prompts)."""
    if path and (explicit or Path(path).is_dir()):
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            warn(f"cannot load the tokenizer from {path} ({type(e).__name__}: {e})")
    warn(
        "no chat template (give the server's model directory with --model-path): "
        "documents are sent as plain prompts"
    )
    return None


# ---- the job ---------------------------------------------------------------------------------


def make_prompter(tokenizer: Any, instruction: str, schema_text: str) -> Callable[[str], str]:
    # The instruction and schema come first and are the same for every document, so the
    # prefix cache computes them once.
    head = f"{instruction}\n\nJSON schema:\n{schema_text}\n\nText:\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return lambda text: f"{head}{text}\n\nJSON:\n"

    def prompt(text: str) -> str:
        messages = [{"role": "user", "content": head + text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return prompt


def make_record(
    doc: Doc, result: dict | None, check: Callable[[Any], str | None], max_new_tokens: int
) -> tuple[dict, str]:
    """(the output line, its category: valid | invalid | error)."""
    record = {
        "id": doc.id,
        "output": None,
        "valid": False,
        "error": doc.error,
        "finish_reason": None,
        "completion_tokens": 0,
    }
    if result is None:
        return record, "error"
    meta = result.get("meta_info") or {}
    reason = meta.get("finish_reason") or {}
    record["finish_reason"] = reason.get("type")
    record["completion_tokens"] = int(meta.get("completion_tokens") or 0)
    if reason.get("type") == "abort":
        record["error"] = reason.get("message") or meta.get("error") or "aborted"
        return record, "error"
    try:
        output = json.loads(result.get("text", ""))
    except ValueError as e:
        if reason.get("type") == "length":
            record["error"] = f"cut off at --max-new-tokens {max_new_tokens} inside the JSON"
        else:
            record["error"] = f"the output is not valid JSON: {e}"
        return record, "invalid"
    record["output"] = output
    record["error"] = check(output)
    record["valid"] = record["error"] is None
    return record, "valid" if record["valid"] else "invalid"


def run_batch(backend: Any, prompts: list[str], params: list[dict]) -> list[dict]:
    """Results for a batch; a batch the server refuses is retried document by document so one
    bad document (say, longer than the context) only fails itself."""
    try:
        return backend.generate(prompts, params)
    except BatchRejected:
        if len(prompts) == 1:
            raise
    results = []
    for prompt, p in zip(prompts, params):
        try:
            results.extend(backend.generate([prompt], [p]))
        except BatchRejected as e:
            message = str(e)
            results.append(
                {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": message}}}
            )
    return results


def preflight(backend: Any, schema_text: str) -> None:
    """Compile the schema once (max_new_tokens 0) so an unsupported schema stops the job before
    any document is processed."""
    params = {"max_new_tokens": 0, "json_schema": schema_text}
    try:
        result = backend.generate(["{"], [params])[0]
    except BatchRejected as e:
        raise UserError(f"the schema cannot be used: {e}") from None
    reason = (result.get("meta_info") or {}).get("finish_reason") or {}
    if reason.get("type") == "abort":
        raise UserError(f"the schema cannot be used: {reason.get('message')}")


def chunks(items: list[Doc], size: int) -> Iterator[list[Doc]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    input_path, output_path = Path(args.input), Path(args.output)
    if input_path.exists() and output_path.exists() and input_path.samefile(output_path):
        raise UserError("--output must be a different file from --input")
    if not output_path.parent.is_dir():
        raise UserError(f"the directory of --output does not exist: {output_path.parent}")
    schema, model = load_schema(args)
    check = make_validator(schema, model)
    schema_text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    docs, repeated = read_documents(input_path, args.text_field, args.id_field)
    done = read_done(output_path)
    todo = [d for d in docs if d.key not in done]
    skipped = len(docs) - len(todo)
    if skipped:
        info(f"resuming: skipped {skipped} already done (ids found in {output_path})")
    counts = {"valid": 0, "invalid": 0, "error": 0}
    tokens, gen_time = 0, 0.0

    def summary() -> str:
        rate = tokens / gen_time if gen_time > 0 else 0.0
        extra = f", {repeated} repeated ids left out" if repeated else ""
        return (
            f"summary: {len(docs)} documents{extra}; skipped {skipped} already done; "
            f"processed {sum(counts.values())}: {counts['valid']} valid, {counts['invalid']} "
            f"invalid, {counts['error']} errors; {tokens} completion tokens in {gen_time:.1f} s "
            f"({rate:.1f} tok/s); output: {output_path}"
        )

    if not todo:
        print(summary())
        return 0

    if args.server_url:
        backend: Any = ServerBackend(args.server_url, args.model_path, args.request_timeout)
    else:
        backend = EngineBackend(args.model_path, args.max_total_tokens)
    try:
        preflight(backend, schema_text)
        prompt = make_prompter(backend.tokenizer, args.instruction, schema_text)
        params = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "repetition_penalty": args.repetition_penalty,
            "json_schema": schema_text,
        }
        bar = tqdm(total=len(docs), initial=skipped, unit="doc", desc="extract", dynamic_ncols=True)
        with output_path.open("a", encoding="utf-8") as out, bar:
            for batch in chunks(todo, args.batch_size):
                runnable = [d for d in batch if d.error is None]
                t0 = time.perf_counter()
                try:
                    results = iter(
                        run_batch(
                            backend,
                            [prompt(d.text or "") for d in runnable],
                            [dict(params) for _ in runnable],
                        )
                        if runnable
                        else []
                    )
                except KeyboardInterrupt:
                    backend.interrupt()
                    raise
                gen_time += time.perf_counter() - t0
                records = [
                    make_record(
                        d, next(results) if d.error is None else None, check, args.max_new_tokens
                    )
                    for d in batch
                ]
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in records))
                out.flush()
                os.fsync(out.fileno())
                for record, category in records:
                    counts[category] += 1
                    tokens += record["completion_tokens"]
                bar.update(len(batch))
                bar.set_postfix(valid=counts["valid"], tok_s=f"{tokens / max(gen_time, 1e-9):.1f}")
    except KeyboardInterrupt:
        info(f"interrupted; {output_path} holds every finished batch: rerun the same command")
        print(summary())
        return 130
    finally:
        backend.close()
    print(summary())
    return 0


# ---- command line ----------------------------------------------------------------------------


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Extract one JSON object per document of a JSONL file, under a JSON schema.",
        epilog="Rerun the same command to resume: ids already in --output are skipped.",
    )
    p.add_argument("--input", required=True, help="JSONL file, one JSON object per document")
    p.add_argument("--output", required=True, help="JSONL results (appended to when resuming)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--schema", help="a JSON schema file")
    g.add_argument("--pydantic", help="a pydantic model: module:Class or path/to/file.py:Class")
    p.add_argument("--text-field", default="text", help="the document text's field (text)")
    p.add_argument("--id-field", default="id", help="the id field (id; else the line number)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="the task sentence")
    p.add_argument("--model-path", default=None, help="model (default SmolLM2-135M-Instruct)")
    p.add_argument("--server-url", default=None, help="use this server instead of a local model")
    p.add_argument("--batch-size", type=positive_int, default=64, help="documents per call (64)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-total-tokens", type=positive_int, default=None, help="KV cache size")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per batch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)  # `kill` stops like Ctrl-C, after a clean write
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BackendError as e:
        print(f"error: {e} (finished batches are saved: rerun to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
