//! The simulator's `EventStore` service, serving events stored encoded.
//!
//! An event store keeps build events serialized, and so does the
//! simulator: each event is encoded once, when the world is generated, and
//! `GetInvocation`/`GetBuild` stream those bytes with the stream's
//! continuation token appended, instead of cloning and encoding every
//! event on every request (which made the simulator the larger part of
//! the CPU in the sim → bridge benchmark). The generated server's codec
//! only encodes prost structs, so this is a small tonic service on the
//! same gRPC paths; framing, compression and status codes are tonic's.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::pb::es;

/// One stored event on its way out: its bytes, and what its continuation
/// token is made of (written straight into the frame, no string per event).
pub(crate) struct StoredEvent {
    /// The encoded `StreamedBuildEvent`, without a continuation token.
    pub event: Bytes,
    /// Id of the invocation or build streamed.
    pub owner: Arc<str>,
    /// Index of the event in that stream.
    pub index: usize,
    /// Whether to add the continuation token.
    pub token: bool,
}

impl StoredEvent {
    /// The message: the stored bytes, then the token (fields may come in
    /// any order), as [`continuation`] spells it.
    fn write(&self, dst: &mut impl BufMut) {
        if !self.token {
            dst.put_slice(&self.event);
            return;
        }
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(self.index);
        let len = "ct.".len() + self.owner.len() + 1 + digits.len();
        dst.put_slice(&self.event);
        encode_key(CONTINUATION_TOKEN_FIELD, WireType::LengthDelimited, dst);
        encode_varint(len as u64, dst);
        dst.put_slice(b"ct.");
        dst.put_slice(self.owner.as_bytes());
        dst.put_u8(b'.');
        dst.put_slice(digits.as_bytes());
    }
}

/// `StreamedBuildEvent.continuation_token`.
const CONTINUATION_TOKEN_FIELD: u32 = 2;

/// Continuation token of event `event` of stream `owner` (opaque to
/// clients): `ct.<owner>.<event>`, as [`StoredEvent`] writes it.
#[cfg(test)]
pub(crate) fn continuation(owner: &str, event: usize) -> String {
    format!("ct.{owner}.{event}")
}

/// Encodes events as stored, for [`StoredEvent`].
pub(crate) fn encode_all(events: &[es::StreamedBuildEvent]) -> Vec<Bytes> {
    events
        .iter()
        .map(|e| {
            debug_assert!(e.continuation_token.is_empty(), "tokens are per stream");
            Bytes::from(e.encode_to_vec())
        })
        .collect()
}

/// Writes stored events as they are; decodes requests with prost.
struct StoredCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for StoredCodec<Req> {
    fn default() -> Self {
        StoredCodec(PhantomData)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for StoredCodec<Req> {
    type Encode = StoredEvent;
    type Decode = Req;
    type Encoder = StoredEncoder;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        StoredEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

struct StoredEncoder;

impl Encoder for StoredEncoder {
    type Item = StoredEvent;
    type Error = Status;

    fn encode(&mut self, item: StoredEvent, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(dst);
        Ok(())
    }
}

struct RequestDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req: Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        Req::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("request does not decode: {e}")))
    }
}

/// What answers the two calls: the simulator's service.
pub(crate) trait StoredEvents: Clone + Send + Sync + 'static {
    /// `GetInvocation`.
    fn get_invocation(&self, req: Request<es::GetInvocationRequest>) -> CallResult;

    /// `GetBuild`.
    fn get_build(&self, req: Request<es::GetBuildRequest>) -> CallResult;
}

/// The `EventStore` gRPC service over `T`.
#[derive(Clone)]
pub(crate) struct EventStoreServer<T>(pub T);

impl<T> NamedService for EventStoreServer<T> {
    const NAME: &'static str = es::event_store_server::SERVICE_NAME;
}

/// One call of a server-streaming method, as tonic's `Grpc` drives it.
struct Call<T, Req>(T, fn(&T, Request<Req>) -> CallResult);

/// What a call answers: the stream of stored events, or why not.
pub(crate) type CallResult = Result<Response<super::service::BoxStream<StoredEvent>>, Status>;

impl<T: StoredEvents, Req: Send + 'static> ServerStreamingService<Req> for Call<T, Req> {
    type Response = StoredEvent;
    type ResponseStream = super::service::BoxStream<StoredEvent>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let result = (self.1)(&self.0, request);
        Box::pin(async move { result })
    }
}

async fn serve<T, Req, B>(
    inner: T,
    method: fn(&T, Request<Req>) -> CallResult,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    T: StoredEvents,
    Req: Message + Default + Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Grpc::new(StoredCodec::<Req>::default())
        .server_streaming(Call(inner, method), req)
        .await
}

impl<T, B> tonic::codegen::Service<http::Request<B>> for EventStoreServer<T>
where
    T: StoredEvents,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.0.clone();
        match req.uri().path() {
            "/engflow.eventstore.v1.EventStore/GetInvocation" => {
                Box::pin(async move { Ok(serve(inner, T::get_invocation, req).await) })
            }
            "/engflow.eventstore.v1.EventStore/GetBuild" => {
                Box::pin(async move { Ok(serve(inner, T::get_build, req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the encoder writes decodes as the event with its token.
    #[test]
    fn stored_bytes_decode_as_the_event_with_its_token() {
        let event = es::StreamedBuildEvent {
            principal: "alice@example.com".into(),
            is_last: true,
            ..Default::default()
        };
        for (owner, index) in [
            ("inv-1", 0),
            ("b7f3c1de-8a0b-4c11-9d3e-5f6a7b8c9d0e", 123_456),
        ] {
            let stored = StoredEvent {
                event: encode_all(std::slice::from_ref(&event)).remove(0),
                owner: Arc::from(owner),
                index,
                token: true,
            };
            let mut frame = bytes::BytesMut::new();
            stored.write(&mut frame);
            let back = es::StreamedBuildEvent::decode(frame.freeze()).unwrap();
            let expected = es::StreamedBuildEvent {
                continuation_token: continuation(owner, index),
                ..event.clone()
            };
            assert_eq!(back, expected);
        }
    }
}
