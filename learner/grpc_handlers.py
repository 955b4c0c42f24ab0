"""Register a servicer so that a request that is not valid protobuf gets INVALID_ARGUMENT.

Why: the generated `add_*_to_server` parses requests with `FromString`; when that raises,
grpc answers a bare INTERNAL ("Exception deserializing request!") that tells the sender
nothing. Here the deserializer returns a marker instead of raising, and the method wrapper
turns it into INVALID_ARGUMENT naming the method, the message type and the parse error. In
a request stream the marker ends the stream the same way at the message where it occurs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass


class UndecodableRequest(ValueError):
    """A request that did not parse as its protobuf type."""


class _Undecodable:
    def __init__(self, type_name: str, size: int, error: str) -> None:
        self.problem = (
            f"request is not a valid {type_name} protobuf ({size} bytes): {error}; "
            "build requests from the fleetlearn.v1 .proto files"
        )


def _deserializer(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, and anything else the parser raises
            return _Undecodable(name, len(data), str(exc) or type(exc).__name__)

    return parse


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Undecodable):
            raise UndecodableRequest(request.problem)
        yield request


def add_servicer(server: grpc.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register every method of `service` implemented by `servicer` on `server`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        kinds = (method.client_streaming, method.server_streaming)
        wrapped = _wrap(behaviour, method.full_name, *kinds)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kinds]
        handlers[method.name] = make(
            wrapped,
            request_deserializer=_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _wrap(
    behaviour: Callable[..., Any], name: str, client_streaming: bool, server_streaming: bool
) -> Callable[..., Any]:
    def refuse(context: grpc.ServicerContext, problem: str) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {problem}")

    if client_streaming and server_streaming:

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                yield from behaviour(_checked(requests), context)
            except UndecodableRequest as exc:
                refuse(context, str(exc))

        return stream_stream
    if client_streaming:

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(_checked(requests), context)
            except UndecodableRequest as exc:
                refuse(context, str(exc))

        return stream_unary
    if server_streaming:

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                refuse(context, request.problem)
            yield from behaviour(request, context)

        return unary_stream

    def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            refuse(context, request.problem)
        return behaviour(request, context)

    return unary_unary
