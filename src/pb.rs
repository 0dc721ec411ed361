//! Generated protobuf and gRPC code, nested by package so the generated
//! cross-package paths resolve, plus short aliases and the descriptor set
//! (for tools and tests that want reflection; the bridge itself does not).

#![allow(missing_docs, clippy::all, clippy::pedantic)]
// Comments copied from the .proto files are not written as rustdoc.
#![allow(rustdoc::all)]

pub mod engflow {
    pub mod notification {
        pub mod v1 {
            tonic::include_proto!("engflow.notification.v1");
        }
    }
    pub mod eventstore {
        pub mod v1 {
            tonic::include_proto!("engflow.eventstore.v1");
        }
    }
    pub mod auth {
        tonic::include_proto!("engflow.auth");
    }
    pub mod iam {
        pub mod v1 {
            tonic::include_proto!("engflow.iam.v1");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod devtools {
        pub mod build {
            pub mod v1 {
                tonic::include_proto!("google.devtools.build.v1");
            }
        }
    }
}

pub mod com {
    pub mod engflow {
        pub mod notificationqueue {
            pub mod demoserver {
                tonic::include_proto!("com.engflow.notificationqueue.demoserver");
            }
        }
    }
}

// Bazel's Build Event Protocol and the files it imports (proto/bazel/).
pub mod build_event_stream {
    tonic::include_proto!("build_event_stream");
}

pub mod blaze {
    tonic::include_proto!("blaze");
    pub mod invocation_policy {
        tonic::include_proto!("blaze.invocation_policy");
    }
    pub mod strategy_policy {
        tonic::include_proto!("blaze.strategy_policy");
    }
}

pub mod command_line {
    tonic::include_proto!("command_line");
}

pub mod failure_details {
    tonic::include_proto!("failure_details");
}

pub mod options {
    tonic::include_proto!("options");
}

pub mod devtools_blaze_proto {
    tonic::include_proto!("devtools_blaze_proto");
}

pub mod devtools {
    pub mod build {
        pub mod lib {
            pub mod packages {
                pub mod metrics {
                    tonic::include_proto!("devtools.build.lib.packages.metrics");
                }
            }
        }
    }
}

pub mod evbridge {
    pub mod v1 {
        tonic::include_proto!("evbridge.v1");
    }
}

pub use build_event_stream as bep;
pub use com::engflow::notificationqueue::demoserver as forward;
pub use engflow::eventstore::v1 as es;
pub use engflow::notification::v1 as nq;
pub use google::devtools::build::v1 as bes;

/// Type URL of the lifecycle payload inside a notification.
pub const LIFECYCLE_TYPE_URL: &str =
    "type.googleapis.com/engflow.eventstore.v1.BuildLifecycleEventNotification";
/// Type URL of Bazel's events inside `BuildEvent.bazel_event`.
pub const BAZEL_EVENT_TYPE_URL: &str = "type.googleapis.com/build_event_stream.BuildEvent";

/// Every message of `proto/` and the well-known types it uses, as an
/// encoded `FileDescriptorSet`.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
