//! `EventStore.GetInvocation` with each streamed event's bytes kept beside
//! the decoded message, so normalization can find fields the schema does
//! not know at every level (prost drops them while decoding).
//!
//! The generated client would decode with prost's codec and forget the
//! bytes; this one speaks the same path and messages with a codec that
//! keeps them (a shared slice of the receive buffer, not a copy).

use bytes::{Buf, Bytes};
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use super::Auth;
use crate::pb::es;

const GET_INVOCATION: &str = "/engflow.eventstore.v1.EventStore/GetInvocation";

/// A streamed event and the bytes it was decoded from.
#[derive(Debug)]
pub(super) struct RawStreamed {
    /// The decoded event, or why its bytes do not decode (a truncated
    /// message, a string that is not UTF-8): then it travels raw, and the
    /// stream goes on, instead of failing the call again and again.
    pub event: Result<es::StreamedBuildEvent, String>,
    /// Its encoding as it arrived.
    pub raw: Bytes,
}

/// The event-store client: one channel, the auth headers, a size limit.
#[derive(Clone)]
pub(super) struct StoreClient {
    inner: tonic::client::Grpc<InterceptedService<Channel, Auth>>,
}

impl StoreClient {
    /// A client that takes messages of up to `max_message_size` bytes.
    pub(super) fn new(channel: Channel, auth: Auth, max_message_size: usize) -> Self {
        StoreClient {
            inner: tonic::client::Grpc::new(InterceptedService::new(channel, auth))
                .max_decoding_message_size(max_message_size),
        }
    }

    /// Streams an invocation's events with their bytes.
    pub(super) async fn get_invocation(
        &mut self,
        request: es::GetInvocationRequest,
    ) -> Result<Streaming<RawStreamed>, Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("event store not ready: {e}")))?;
        let path = PathAndQuery::from_static(GET_INVOCATION);
        let response = self
            .inner
            .server_streaming(Request::new(request), path, RawCodec)
            .await?;
        Ok(response.into_inner())
    }
}

/// Encodes requests with prost; decodes responses keeping their bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = es::GetInvocationRequest;
    type Decode = RawStreamed;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = es::GetInvocationRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding GetInvocationRequest: {e}")))
    }
}

impl Decoder for RawCodec {
    type Item = RawStreamed;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let raw = buf.copy_to_bytes(buf.remaining());
        let event = es::StreamedBuildEvent::decode(raw.clone())
            .map_err(|e| format!("a streamed event does not decode: {e}"));
        Ok(Some(RawStreamed { event, raw }))
    }
}
