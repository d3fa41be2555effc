"""Parse submissions with the Python 3.12 grammar on any interpreter the scanner runs on (3.11 included).

Upstream self-extracting wrappers were produced on Python 3.12, and their payloads use PEP 701 f-strings: the
same quote nested inside a replacement field (``f"{d["k"]}"``), backslashes and comments in fields. Python 3.11's
``ast`` rejects them. The rest of the scanner works on ``ast`` trees, so instead of a second parser with its own
tree type this module rewrites only the f-strings into an equivalent 3.11 form and parses that:

    f"a{x["k"]!r:>{w}}b"   becomes   "a{!r:>{}}b".format(x["k"], w)

The template keeps every literal part (the detectors read log-line text such as ``val_bpb``), the replacement
fields become ordinary call arguments (so their data flow is analysed), and every newline of the original is kept,
so line numbers in findings still point at the original source. The rewrite is a small hand-written lexer (strings,
comments, brackets); it is applied only when the plain parse fails, so code that 3.11 already reads is parsed
exactly as before. (parso, the maintained pure-Python parser, produces its own tree rather than ``ast``, and its
tokenizer predates PEP 701.)
"""

from __future__ import annotations

import ast
import re

_PREFIX = re.compile(r"(?i)(rb|br|fr|rf|[rbuf])?(\"\"\"|'''|\"|')")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_]")
_WORD = re.compile(r"\w+")


class _Lexer:
    """Copies source text, rewriting every f-string literal it meets into a ``str.format`` call."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> SyntaxError:
        line = self.text.count("\n", 0, self.pos) + 1
        return SyntaxError(message, ("<normalised>", line, 0, ""))

    # -- code context ------------------------------------------------------------------------------------------

    def code(self, stop: str | None = None) -> str:
        """Code up to (not including) an unbracketed character of ``stop`` (inside an f-string field), or to the
        end of the text. Strings are copied (f-strings rewritten), comments dropped in fields and kept outside."""
        out: list[str] = []
        depth = 0
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if stop is not None and depth == 0 and char in stop:
                if char == "!" and text.startswith("!=", self.pos):
                    out.append("!=")
                    self.pos += 2
                    continue
                if char == "=" and (text.startswith("==", self.pos) or (out and out[-1][-1:] in "=!<>")):
                    out.append(char)
                    self.pos += 1
                    continue
                return "".join(out)
            if char == "#":
                end = text.find("\n", self.pos)
                end = len(text) if end < 0 else end
                if stop is None:
                    out.append(text[self.pos:end])
                self.pos = end
                continue
            if char in "\"'" or (char.isalpha() and self._string_start()):
                out.append(self.string())
                continue
            if char.isalnum() or char == "_":
                match = _WORD.match(text, self.pos)
                assert match is not None
                out.append(match.group())
                self.pos = match.end()
                continue
            if char in "([{":
                depth += 1
            elif char in ")]}":
                if depth == 0 and stop is not None:
                    raise self.error("unbalanced bracket in f-string field")
                depth -= 1
            out.append(char)
            self.pos += 1
        if stop is not None:
            raise self.error("unterminated f-string field")
        return "".join(out)

    def _string_start(self) -> bool:
        if self.pos > 0 and _IDENT_CHAR.match(self.text[self.pos - 1]):
            return False
        match = _PREFIX.match(self.text, self.pos)
        return match is not None and match.group(1) is not None

    # -- strings -----------------------------------------------------------------------------------------------

    def string(self) -> str:
        match = _PREFIX.match(self.text, self.pos)
        if match is None:
            raise self.error("not a string")
        prefix, quote = match.group(1) or "", match.group(2)
        self.pos = match.end()
        if "f" in prefix.lower():
            return self.fstring(prefix, quote)
        start = self.pos
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated string literal")
            char = self.text[self.pos]
            if char == "\\":
                self.pos += 2  # an escaped quote does not end the literal, raw or not
                continue
            if self.text.startswith(quote, self.pos):
                body = self.text[start:self.pos]
                self.pos += len(quote)
                return prefix + quote + body + quote
            if char == "\n" and len(quote) == 1:
                raise self.error("unterminated string literal")
            self.pos += 1

    def fstring(self, prefix: str, quote: str) -> str:
        template_prefix = prefix.lower().replace("f", "")
        template, args = self.fstring_body(quote, raw="r" in template_prefix, in_spec=False)
        literal = template_prefix + quote + template + quote
        # Keep the newlines of the fields: they are inside the call's parentheses, so lines stay aligned.
        return f"({literal}.format({', '.join(args)}))" if args else f"({literal})"

    def fstring_body(self, quote: str, raw: bool, in_spec: bool) -> tuple[str, list[str]]:
        """The template text up to the closing quote (or, in a format spec, up to the field's ``}``) and the
        argument expressions of its replacement fields, in ``str.format`` auto-numbering order."""
        template: list[str] = []
        args: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated f-string")
            if in_spec and text[self.pos] == "}":
                return "".join(template), args
            if not in_spec and text.startswith(quote, self.pos):
                self.pos += len(quote)
                return "".join(template), args
            char = text[self.pos]
            if char == "\\" and raw:
                # In a raw f-string a backslash is literal, but it still keeps the next quote from closing it.
                step = 2 if text[self.pos + 1:self.pos + 2] in ("'", '"') else 1
                template.append(text[self.pos:self.pos + step])
                self.pos += step
                continue
            if char == "\\":
                if text.startswith("\\N{", self.pos):
                    end = text.index("}", self.pos)
                    template.append(text[self.pos:end + 1])
                    self.pos = end + 1
                else:
                    template.append(text[self.pos:self.pos + 2])
                    self.pos += 2
                continue
            if text.startswith("{{", self.pos) or text.startswith("}}", self.pos):
                template.append(text[self.pos:self.pos + 2])
                self.pos += 2
                continue
            if char == "{":
                self.pos += 1
                field, field_args = self.field(quote, raw)
                template.append(field)
                args.extend(field_args)
                continue
            if char == "\n" and len(quote) == 1:
                raise self.error("unterminated f-string")
            template.append(char)
            self.pos += 1

    def field(self, quote: str, raw: bool) -> tuple[str, list[str]]:
        expression = self.code(stop="=!:}")
        template = "{"
        debug = ""
        if self.text[self.pos] == "=":
            debug = expression + "="
            self.pos += 1
            while self.text[self.pos] in " \t":
                debug += self.text[self.pos]
                self.pos += 1
        conversion = ""
        if self.text[self.pos] == "!":
            conversion = self.text[self.pos:self.pos + 2]
            self.pos += 2
        elif debug and self.text[self.pos] != ":":
            conversion = "!r"
        args = [f"({expression})"]
        spec = ""
        if self.text[self.pos] == ":":
            self.pos += 1
            spec_text, spec_args = self.fstring_body(quote, raw, in_spec=True)
            spec = ":" + spec_text
            args.extend(spec_args)
        if self.text[self.pos] != "}":
            raise self.error("f-string field is not closed")
        self.pos += 1
        # The "expr=" text of a debug field is only a label; drop what could break the template's quoting.
        literal = re.sub(r"[\\'\"\n{}]", "", debug)
        return literal + template + conversion + spec + "}", args


def normalise_fstrings(source: str) -> str:
    """``source`` with every f-string rewritten as a ``str.format`` call (Python 3.12 f-strings included)."""
    return _Lexer(source).code()


def parse_python(source: str) -> ast.Module:
    """``ast.parse`` with the Python 3.12 f-string grammar. Raises the original ``SyntaxError`` when the source is
    not valid Python under either reading (so its line and message are the ones a reader expects)."""
    try:
        return ast.parse(source)
    except SyntaxError as original:
        try:
            normalised = normalise_fstrings(source)
        except (SyntaxError, IndexError, ValueError):
            raise original from None
        try:
            return ast.parse(normalised)
        except SyntaxError:
            raise original from None
