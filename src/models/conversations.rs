//! Server-side conversation memory for seed 002's `/llm_request` with `memory: true`.
//!
//! A conversation is the list of turns one owner (a user, or a key that has no user) stored
//! under one `conversation_number`; another owner's conversation with the same number is a
//! different conversation. A request sends the stored turns plus its new user message as one
//! chat, trimmed from the oldest turns to fit the model's context ([`fit`]); after a successful
//! generation both the user message and the reply are appended ([`append`]).

use sea_orm::{entity::prelude::*, ActiveValue::Set, QueryOrder, QuerySelect, TransactionTrait};

pub use super::_entities::conversation_messages::{self, ActiveModel, Column, Entity, Model};
use super::{api_keys, now, ModelError};
use crate::engine::ChatMessage;

impl ActiveModelBehavior for ActiveModel {}

/// Messages one conversation keeps; appending beyond this drops its oldest ones. A request only
/// ever sends what fits the context (a few hundred turns at most for any model served here),
/// so older turns would never be read again and only grow the table.
pub const KEPT_MESSAGES: u64 = 512;

/// Whose memory a conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    User(i32),
    /// A key without a user keeps its own conversations.
    Key(i32),
}

impl Owner {
    #[must_use]
    pub fn of(key: &api_keys::Model) -> Self {
        key.user_id.map_or(Self::Key(key.id), Self::User)
    }

    fn scope<Q: QueryFilter>(self, query: Q) -> Q {
        match self {
            Self::User(id) => query.filter(Column::UserId.eq(id)),
            Self::Key(id) => query
                .filter(Column::ApiKeyId.eq(id))
                .filter(Column::UserId.is_null()),
        }
    }

    fn columns(self) -> (Option<i32>, Option<i32>) {
        match self {
            Self::User(id) => (Some(id), None),
            Self::Key(id) => (None, Some(id)),
        }
    }
}

/// The newest `limit` messages of a conversation, oldest first.
///
/// # Errors
/// On database errors.
pub async fn recent<C: ConnectionTrait>(
    db: &C,
    owner: Owner,
    number: i64,
    limit: u64,
) -> Result<Vec<ChatMessage>, ModelError> {
    let mut rows = owner
        .scope(Entity::find().filter(Column::ConversationNumber.eq(number)))
        .order_by_desc(Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    rows.reverse();
    Ok(rows
        .into_iter()
        .map(|m| ChatMessage::new(m.role, m.content))
        .collect())
}

/// Every stored message of a conversation, oldest first (for inspection and tests).
///
/// # Errors
/// On database errors.
pub async fn messages<C: ConnectionTrait>(
    db: &C,
    owner: Owner,
    number: i64,
) -> Result<Vec<Model>, ModelError> {
    Ok(owner
        .scope(Entity::find().filter(Column::ConversationNumber.eq(number)))
        .order_by_asc(Column::Id)
        .all(db)
        .await?)
}

/// Appends one exchange (the user's message and the model's reply) in one transaction.
///
/// # Errors
/// On database errors.
pub async fn append(
    db: &DatabaseConnection,
    owner: Owner,
    number: i64,
    user_text: &str,
    reply: &str,
    job_id: &str,
) -> Result<(), ModelError> {
    let (user_id, api_key_id) = owner.columns();
    let ts = now();
    let txn = db.begin().await?;
    for (role, content) in [("user", user_text), ("assistant", reply)] {
        ActiveModel {
            user_id: Set(user_id),
            api_key_id: Set(api_key_id),
            conversation_number: Set(number),
            role: Set(role.to_string()),
            content: Set(content.to_string()),
            job_id: Set(Some(job_id.to_string())),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
    }
    // The oldest message still kept; everything older in this conversation goes.
    let oldest_kept = owner
        .scope(Entity::find().filter(Column::ConversationNumber.eq(number)))
        .order_by_desc(Column::Id)
        .offset(KEPT_MESSAGES - 1)
        .one(&txn)
        .await?;
    if let Some(oldest_kept) = oldest_kept {
        owner
            .scope(Entity::delete_many())
            .filter(Column::ConversationNumber.eq(number))
            .filter(Column::Id.lt(oldest_kept.id))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(())
}

/// The chat to send: the newest suffix of `history` (cut at a user turn, so no reply is left
/// without its question) followed by `message`, whose token count is at most `budget`.
/// `count` renders and counts a chat; it is monotone in the number of messages, so the cut is
/// found by binary search over the turn starts (a few renders even for long histories). When
/// not even `message` alone fits, it is returned alone and the caller's context check decides.
///
/// # Errors
/// Whatever `count` fails with.
pub fn fit<E>(
    history: Vec<ChatMessage>,
    message: ChatMessage,
    budget: usize,
    count: impl Fn(&[ChatMessage]) -> Result<usize, E>,
) -> Result<Vec<ChatMessage>, E> {
    let mut chat = history;
    chat.push(message);
    let last = chat.len() - 1;
    // Candidate starts: every user turn in the history, then the new message alone.
    let mut starts: Vec<usize> = (0..last).filter(|&i| chat[i].role == "user").collect();
    starts.push(last);
    let (mut lo, mut hi) = (0, starts.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if count(&chat[starts[mid]..])? <= budget {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(chat.split_off(starts[lo]))
}

#[cfg(test)]
mod tests {
    use super::{fit, ChatMessage};

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    /// One "token" per character plus 2 per message of template overhead.
    fn count(chat: &[ChatMessage]) -> Result<usize, ()> {
        Ok(chat.iter().map(|m| m.content.len() + 2).sum())
    }

    #[test]
    fn keeps_everything_that_fits_and_drops_whole_turns_from_the_oldest() {
        let history = vec![
            msg("user", "aaaa"),
            msg("assistant", "bbbb"),
            msg("user", "cccc"),
            msg("assistant", "dddd"),
        ];
        let new = msg("user", "eeee");
        let all = fit(history.clone(), new.clone(), 30, count).unwrap_or_default();
        assert_eq!(all.len(), 5);
        // 18 fits the last turn (12) plus the new message (6) but not two turns (30).
        let cut = fit(history.clone(), new.clone(), 18, count).unwrap_or_default();
        assert_eq!(
            cut,
            vec![msg("user", "cccc"), msg("assistant", "dddd"), new.clone()]
        );
        // Nothing fits: the new message alone.
        let alone = fit(history, new.clone(), 3, count).unwrap_or_default();
        assert_eq!(alone, vec![new]);
    }

    #[test]
    fn a_leading_reply_without_its_question_is_dropped_with_the_oldest_turn() {
        let history = vec![
            msg("assistant", "orphan"),
            msg("user", "q"),
            msg("assistant", "a"),
        ];
        let new = msg("user", "n");
        let cut = fit(history, new.clone(), 9, count).unwrap_or_default();
        assert_eq!(cut, vec![msg("user", "q"), msg("assistant", "a"), new]);
    }
}
