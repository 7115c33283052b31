//! Where push's and pull's own errors become HTTP answers: each domain error maps to the status,
//! JSON body and headers of one `ApiError`, so the domain never speaks HTTP.

use crate::error::ApiError;
use crate::protocol::ProtocolError;
use crate::pull::PullError;
use crate::push::PushError;

impl From<PushError> for ApiError {
    fn from(error: PushError) -> Self {
        match error {
            PushError::Invalid(body) => body.into(),
            PushError::TooManyClients { .. } => {
                ApiError::bad_request("TooManyClients", error.to_string())
            }
            PushError::ClientStateNotFound => ProtocolError::ClientStateNotFound.into(),
            PushError::Forbidden(refusal) => refusal.into(),
            PushError::Partial { applied } => ApiError::PartiallyApplied { applied },
            PushError::TooManyMutations { .. } => ApiError::TooManyMutations(error.to_string()),
            PushError::TookTooLong { .. } => ApiError::CallTookTooLong(error.to_string()),
            PushError::MutationFailed {
                index,
                name,
                reason,
                message,
            } => ApiError::MutationFailed {
                index,
                name,
                reason,
                message,
            },
            PushError::Store(cause) => ApiError::Store(cause),
            PushError::GroupFailed => ApiError::Failed(error.to_string()),
        }
    }
}

impl From<PullError> for ApiError {
    fn from(error: PullError) -> Self {
        match error {
            PullError::Invalid(body) => body.into(),
            PullError::ClientStateNotFound => ProtocolError::ClientStateNotFound.into(),
            PullError::Forbidden(refusal) => refusal.into(),
            PullError::TooManyStreamed { .. } => ApiError::Overloaded(error.to_string()),
            PullError::Store(cause) => ApiError::Store(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn too_many_clients_keeps_its_message_and_name() {
        let ApiError::BadRequest { error, message } =
            ApiError::from(PushError::TooManyClients { max: 3 })
        else {
            panic!("TooManyClients is a bad request");
        };
        assert_eq!(error, "TooManyClients");
        assert_eq!(
            message,
            "the push names more than 3 client ids; the limit is REPLISYNC_MAX_CLIENTS_PER_PUSH"
        );
    }

    #[test]
    fn too_many_streamed_pulls_keeps_its_message() {
        let ApiError::Overloaded(message) =
            ApiError::from(PullError::TooManyStreamed { max_streamed: 2 })
        else {
            panic!("too many streamed pulls is an overload");
        };
        assert_eq!(
            message,
            "2 streamed pulls (first pulls and large deltas) are in flight (REPLISYNC_MAX_FIRST_PULLS); retry shortly"
        );
    }

    #[test]
    fn domain_errors_map_to_the_same_answers() {
        assert!(matches!(
            ApiError::from(PushError::ClientStateNotFound),
            ApiError::Protocol(ProtocolError::ClientStateNotFound)
        ));
        assert!(matches!(
            ApiError::from(PullError::ClientStateNotFound),
            ApiError::Protocol(ProtocolError::ClientStateNotFound)
        ));
        assert!(matches!(
            ApiError::from(PushError::Partial { applied: 4 }),
            ApiError::PartiallyApplied { applied: 4 }
        ));
        assert!(matches!(
            ApiError::from(PushError::Store(StoreError::TimedOut("lock".into()))),
            ApiError::Store(StoreError::TimedOut(_))
        ));
    }
}
