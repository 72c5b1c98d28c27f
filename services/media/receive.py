"""Receiving an upload: the request body streamed into a file, counted as it comes, whether it is the
photo itself (raw body with its Content-Type) or a multipart/form-data form holding it in one file part
(python-multipart's streaming parser: the part's bytes go straight to the file, nothing is buffered).

Over ``limit`` photo bytes is :class:`TooLarge` at once (the caller deletes the file: nothing stored). A
multipart body may exceed the photo's limit by at most ``FORM_OVERHEAD`` bytes of headers and fields.
"""
from __future__ import annotations

from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.domain.errors import Invalid, TooLarge

HEAD = 16  # bytes enough for every accepted magic number
FORM_OVERHEAD = 64 * 1024


class Sink:
    """The photo's bytes, into ``out``; ``declared`` is the content type its sender gave it."""

    def __init__(self, out: IO[bytes], limit: int, declared: str | None) -> None:
        self.out, self.limit, self.declared = out, limit, declared
        self.size, self.head = 0, b""

    def photo(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(f"a photo may have at most {self.limit} bytes", field="body", limit=self.limit)
        if len(self.head) < HEAD:
            self.head += chunk[:HEAD - len(self.head)]
        self.out.write(chunk)

    def write(self, chunk: bytes) -> None:
        self.photo(chunk)

    def finish(self) -> None:
        if self.size == 0:
            raise Invalid("the body is empty: send the photo's bytes", field="body")


class FormSink(Sink):
    """multipart/form-data: the one file part (a part with a filename, or named ``file``) is the photo."""

    def __init__(self, out: IO[bytes], limit: int, boundary: bytes) -> None:
        super().__init__(out, limit, None)
        self.files = 0
        self._in_file = False
        self._field = self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        }, max_size=limit + FORM_OVERHEAD)
        self.received = 0

    def _begin(self) -> None:
        self._headers, self._in_file = {}, False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" in params or params.get(b"name") == b"file":
            self.files += 1
            if self.files > 1:
                raise Invalid("send one photo per upload (the form has more than one file)", field="file")
            self._in_file = True
            kind = self._headers.get(b"content-type")
            self.declared = parse_options_header(kind)[0].decode("latin-1").lower() if kind else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.photo(bytes(data[start:end]))

    def _end(self) -> None:
        self._in_file = False

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limit + FORM_OVERHEAD:
            raise TooLarge(f"a photo may have at most {self.limit} bytes", field="body", limit=self.limit)
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise Invalid(f"the multipart body is malformed: {e}", field="body") from None

    def finish(self) -> None:
        try:
            self.parser.finalize()
        except MultipartParseError as e:
            raise Invalid(f"the multipart body is malformed: {e}", field="body") from None
        if self.files == 0:
            raise Invalid("the form has no file part: send the photo as the part named file", field="file")
        super().finish()


def sink_for(content_type: str | None, out: IO[bytes], limit: int) -> Sink:
    """A raw body's sink (its Content-Type is the photo's), or a form's."""
    if content_type is None:
        return Sink(out, limit, None)
    kind, params = parse_options_header(content_type)
    if kind.lower() == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise Invalid("multipart/form-data without a boundary", field="Content-Type")
        return FormSink(out, limit, boundary)
    return Sink(out, limit, kind.decode("latin-1").lower())
