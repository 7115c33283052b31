//! The engine's side of a push's session: the link that carries a mutation's `tx` requests to
//! the push and its answers back, and the host functions the shim builds `tx` on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use rquickjs::{Ctx, Function, Object};

use super::messages::{Call, EngineEnd, FromEngine, HostReply, HostRequest, RunError, ToEngine};

/// The engine's link to the push it serves: the channels of the push's session, attached to a
/// space's context for as long as it serves the push.
pub(super) struct Link {
    to_push: RefCell<tokio::sync::mpsc::UnboundedSender<FromEngine>>,
    from_push: RefCell<tokio::sync::mpsc::UnboundedReceiver<ToEngine>>,
    /// The token of the `tx` of the mutation running in this context (0: none runs). A `tx`
    /// with another token belongs to a mutation that has ended.
    live_tx: Cell<u64>,
    /// What the push sent along with the running mutation, by key (JSON text, `None`: absent),
    /// less what the mutation wrote since.
    known: RefCell<HashMap<String, Option<String>>>,
}

impl Link {
    /// A link to no push (a context between pushes, or loading the module at start-up).
    pub(super) fn detached() -> Link {
        let (to_push, _) = tokio::sync::mpsc::unbounded_channel();
        let (_, from_push) = tokio::sync::mpsc::unbounded_channel();
        Link {
            to_push: RefCell::new(to_push),
            from_push: RefCell::new(from_push),
            live_tx: Cell::new(0),
            known: RefCell::default(),
        }
    }

    /// A link to the push at the other `end`.
    pub(super) fn attached(end: EngineEnd) -> Link {
        Link {
            to_push: RefCell::new(end.to_push),
            from_push: RefCell::new(end.from_push),
            live_tx: Cell::new(0),
            known: RefCell::default(),
        }
    }

    /// Takes `session`'s channels (leaving it detached).
    pub(super) fn attach_from(&self, session: &Link) {
        self.to_push.swap(&session.to_push);
        self.from_push.swap(&session.from_push);
    }

    /// Gives the channels back to `session` (leaving this link detached).
    pub(super) fn detach_into(&self, session: &Link) {
        self.to_push.swap(&session.to_push);
        self.from_push.swap(&session.from_push);
    }

    /// Makes the `tx` holding `token` the one whose requests are answered (0: none is), with
    /// `known` the entries the push sent along with its mutation.
    pub(super) fn set_live_tx(&self, token: u64, known: Vec<(String, Option<String>)>) {
        self.live_tx.set(token);
        *self.known.borrow_mut() = known.into_iter().collect();
    }

    /// What the push sent along for `key`, for the live `tx` only (any other is refused by
    /// [`Link::ask`]); `None` when only the push can tell.
    fn known(&self, token: f64, key: &str) -> Option<Option<String>> {
        if token != self.live_tx.get() as f64 || token == 0.0 {
            return None;
        }
        self.known.borrow().get(key).cloned()
    }

    /// Forgets what was sent along for `key`, which the mutation writes: the push answers for it
    /// from now on.
    fn forget(&self, key: &str) {
        self.known.borrow_mut().remove(key);
    }

    pub(super) fn send(&self, message: FromEngine) {
        let _ = self.to_push.borrow().send(message);
    }

    /// The push's next mutation; `None` when the push let the session go.
    pub(super) fn next_call(&self) -> Option<Call> {
        loop {
            match self.from_push.borrow_mut().blocking_recv()? {
                ToEngine::Run(call) => return Some(call),
                ToEngine::Reply(_) => continue, // an answer nobody waits for
            }
        }
    }

    /// Asks the push for a read or write on behalf of the `tx` holding `token`, and waits for
    /// its answer. A `tx` kept past its mutation is refused.
    fn ask(&self, token: f64, request: HostRequest) -> HostReply {
        if token != self.live_tx.get() as f64 || token == 0.0 {
            return Err(
                "this tx belongs to a mutation that has ended: use the tx passed to the running mutator, and do not keep it"
                    .into(),
            );
        }
        if self
            .to_push
            .borrow()
            .send(FromEngine::Host(request))
            .is_err()
        {
            return Err("the push has ended".into());
        }
        match self.from_push.borrow_mut().blocking_recv() {
            Some(ToEngine::Reply(reply)) => reply,
            Some(ToEngine::Run(_)) => Err("the push sent a mutation while one was running".into()),
            None => Err("the push has ended".into()),
        }
    }
}

/// Answers `first` and every later call of a session with the engine's `fault`, until the push
/// drops it.
pub(super) fn fail_every_call(session: &Link, first: Option<Call>, fault: &str) {
    let mut next = first;
    while next.is_some() {
        session.send(FromEngine::Done(Err(RunError::Engine(fault.to_owned()))));
        next = session.next_call();
    }
}

/// The host functions the shim builds `tx` on: `get`, `has`, `scan`, `put` and `del`, each a
/// synchronous request to the push, made with the token of the `tx` that asks (a `get` or `has`
/// of what the push sent along with the mutation is answered here).
pub(super) fn host_object<'js>(ctx: &Ctx<'js>, link: &Rc<Link>) -> rquickjs::Result<Object<'js>> {
    let host = Object::new(ctx.clone())?;
    let l = link.clone();
    host.set(
        "get",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| match l.known(token, &key) {
                Some(value) => Ok(value),
                None => answer(&ctx, l.ask(token, HostRequest::Get(key))),
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "has",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| match l.known(token, &key) {
                Some(value) => Ok(value.is_some()),
                None => answer(&ctx, l.ask(token, HostRequest::Has(key)))
                    .map(|text| text.as_deref() == Some("true")),
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "scan",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  token: f64,
                  prefix: String,
                  start: String,
                  exclusive: bool,
                  limit: f64| {
                let limit = if limit.is_finite() && limit > 0.0 {
                    limit as usize
                } else {
                    0
                };
                let request = HostRequest::Scan {
                    prefix,
                    start,
                    exclusive,
                    limit,
                };
                answer(&ctx, l.ask(token, request)).map(|text| text.unwrap_or_else(|| "[]".into()))
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "put",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String, value: String| {
                l.forget(&key);
                answer(&ctx, l.ask(token, HostRequest::Put(key, value))).map(drop)
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "del",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| {
                l.forget(&key);
                answer(&ctx, l.ask(token, HostRequest::Del(key)))
                    .map(|text| text.as_deref() == Some("true"))
            },
        )?,
    )?;
    Ok(host)
}

/// A reply as the host function's result, or an `Error` thrown in JavaScript.
fn answer(ctx: &Ctx<'_>, reply: HostReply) -> rquickjs::Result<Option<String>> {
    reply.map_err(|message| rquickjs::Exception::throw_message(ctx, &message))
}
