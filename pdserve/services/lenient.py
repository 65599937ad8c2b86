"""Registering a gRPC servicer whose methods answer undecodable request bytes with
INVALID_ARGUMENT instead of UNKNOWN.

grpc aio turns a request deserializer that raises into UNKNOWN and logs a traceback;
the generated `add_*Servicer_to_server` functions use the raising `FromString`. Here
each request is decoded by a parser that returns a `Malformed` marker instead, and the
method refuses the marker before the servicer sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor


@dataclass(frozen=True)
class Malformed:
    """Request bytes that did not decode."""

    type_name: str
    error: str

    def message(self) -> str:
        return f"malformed {self.type_name}: {self.error}"


def lenient_parser(message_cls):
    """A request deserializer that never raises."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # DecodeError, or anything the parser throws at junk
            return Malformed(message_cls.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)
    return parse


def _refusing_unary(method):
    async def call(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        return await method(request, context)
    return call


def _refusing_stream(method):
    async def call(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        async for item in method(request, context):
            yield item
    return call


def add_lenient_servicer(servicer, server, service: ServiceDescriptor, *,
                         refuse_malformed: bool = True) -> None:
    """As the generated add_<Service>Servicer_to_server, for unary-request methods.

    refuse_malformed=False hands `Malformed` to the servicer, which must refuse it
    itself (the router checks the API key first).
    """
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported")
        impl = getattr(servicer, method.name)
        make = grpc.unary_unary_rpc_method_handler
        wrap = _refusing_unary
        if method.server_streaming:
            make, wrap = grpc.unary_stream_rpc_method_handler, _refusing_stream
        handlers[method.name] = make(
            wrap(impl) if refuse_malformed else impl,
            request_deserializer=lenient_parser(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)
