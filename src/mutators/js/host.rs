//! The engine's side of a push's session: the link that carries a mutation's `tx` reads to the
//! push and its answers back, and the host functions the shim builds `tx` on. Writes are made
//! here, in the writes the push lent the mutation, checked as the push would check them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use rquickjs::{Ctx, Function, Object};

use super::messages::{Call, EngineEnd, FromEngine, HostReply, HostRequest, RunError, ToEngine};
use crate::mutators::{MutationError, MutationWrites};
use crate::rules::KeySet;

/// The engine's link to the push it serves: the channels of the push's session, attached to a
/// space's context for as long as it serves the push.
pub(super) struct Link {
    to_push: RefCell<tokio::sync::mpsc::UnboundedSender<FromEngine>>,
    from_push: RefCell<tokio::sync::mpsc::UnboundedReceiver<ToEngine>>,
    /// The token of the `tx` of the mutation running in this context (0: none runs). A `tx`
    /// with another token belongs to a mutation that has ended.
    live_tx: Cell<u64>,
    /// What the push sent along with the running mutation, by key (JSON text, `None`: absent);
    /// what the mutation wrote since is in `writes`.
    known: RefCell<HashMap<String, Option<String>>>,
    /// The running mutation's writes (`None` between mutations, and while a scan's request
    /// holds them), and the keys the caller may write.
    writes: RefCell<Option<MutationWrites>>,
    writable: RefCell<KeySet>,
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
            writes: RefCell::default(),
            writable: RefCell::new(KeySet::All),
        }
    }

    /// A link to the push at the other `end`.
    pub(super) fn attached(end: EngineEnd) -> Link {
        Link {
            to_push: RefCell::new(end.to_push),
            from_push: RefCell::new(end.from_push),
            live_tx: Cell::new(0),
            known: RefCell::default(),
            writes: RefCell::default(),
            writable: RefCell::new(KeySet::All),
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

    /// Makes the `tx` holding `token` the one whose requests are answered, with the entries
    /// the push sent along (`known`), the writes it lent and the keys the caller may write.
    pub(super) fn start_tx(
        &self,
        token: u64,
        known: Vec<(String, Option<String>)>,
        writes: MutationWrites,
        writable: KeySet,
    ) {
        self.live_tx.set(token);
        *self.known.borrow_mut() = known.into_iter().collect();
        *self.writes.borrow_mut() = Some(writes);
        *self.writable.borrow_mut() = writable;
    }

    /// Ends the live `tx` (none is, from now on), and hands back its mutation's writes.
    pub(super) fn end_tx(&self) -> Option<MutationWrites> {
        self.live_tx.set(0);
        self.known.borrow_mut().clear();
        self.writes.borrow_mut().take()
    }

    /// Refuses a `tx` other than the live one.
    fn check_live(&self, token: f64) -> Result<(), String> {
        if token != self.live_tx.get() as f64 || token == 0.0 {
            return Err(
                "this tx belongs to a mutation that has ended: use the tx passed to the running mutator, and do not keep it"
                    .into(),
            );
        }
        Ok(())
    }

    /// What the live `tx` sees at `key` without asking the push: what its mutation wrote, else
    /// what the push sent along (JSON text, `Some(None)`: absent); `None` when only the push
    /// can tell, or for another `tx` (which [`Link::ask`] refuses).
    fn local(&self, token: f64, key: &str) -> Option<Option<String>> {
        self.check_live(token).ok()?;
        if let Some(written) = self.writes.borrow().as_ref().and_then(|w| w.get(key)) {
            return Some(written.map(|value| value.to_string()));
        }
        self.known.borrow().get(key).cloned()
    }

    /// Makes a write of the live `tx` with `write`, which checks it as the push would: its
    /// refusal is thrown in JavaScript (and remembered in the writes, failing the mutation if
    /// the mutator catches it).
    fn write(
        &self,
        token: f64,
        write: impl FnOnce(&mut MutationWrites, &KeySet) -> Result<(), MutationError>,
    ) -> HostReply {
        self.check_live(token)?;
        let mut writes = self.writes.borrow_mut();
        let writes = writes.as_mut().ok_or("the mutation's writes are gone")?;
        write(writes, &self.writable.borrow()).map_err(|error| error.to_string())?;
        Ok(None)
    }

    /// Takes the live `tx`'s writes for a request that needs them (a scan); [`Link::ask`] puts
    /// them back with its reply.
    fn lend_writes(&self, token: f64) -> Result<MutationWrites, String> {
        self.check_live(token)?;
        self.writes
            .borrow_mut()
            .take()
            .ok_or_else(|| "the mutation's writes are gone".into())
    }

    pub(super) fn send(&self, message: FromEngine) {
        let _ = self.to_push.borrow().send(message);
    }

    /// The push's next mutation; `None` when the push let the session go.
    pub(super) fn next_call(&self) -> Option<Call> {
        loop {
            match self.from_push.borrow_mut().blocking_recv()? {
                ToEngine::Run(call) => return Some(call),
                ToEngine::Reply(..) => continue, // an answer nobody waits for
            }
        }
    }

    /// Asks the push for a read on behalf of the `tx` holding `token`, and waits for its answer
    /// (and the writes the request took along, if any). A `tx` kept past its mutation is refused.
    fn ask(&self, token: f64, request: HostRequest) -> HostReply {
        self.check_live(token)?;
        if self
            .to_push
            .borrow()
            .send(FromEngine::Host(request))
            .is_err()
        {
            return Err("the push has ended".into());
        }
        match self.from_push.borrow_mut().blocking_recv() {
            Some(ToEngine::Reply(reply, writes)) => {
                if writes.is_some() {
                    *self.writes.borrow_mut() = writes;
                }
                reply
            }
            Some(ToEngine::Run(_)) => Err("the push sent a mutation while one was running".into()),
            None => Err("the push has ended".into()),
        }
    }
}

/// Answers `first` and every later call of a session with the engine's `fault`, until the push
/// drops it.
pub(super) fn fail_every_call(session: &Link, first: Option<Call>, fault: &str) {
    let mut next = first;
    while let Some(call) = next {
        let failed = Err(RunError::Engine(fault.to_owned()));
        session.send(FromEngine::Done(failed, Some(call.writes)));
        next = session.next_call();
    }
}

/// The host functions the shim builds `tx` on: `get`, `has`, `scan`, `put` and `del`, each
/// synchronous, made with the token of the `tx` that asks: writes, and reads of what the
/// mutation wrote or the push sent along, are answered here; other reads by the push.
pub(super) fn host_object<'js>(ctx: &Ctx<'js>, link: &Rc<Link>) -> rquickjs::Result<Object<'js>> {
    let host = Object::new(ctx.clone())?;
    let l = link.clone();
    host.set(
        "get",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| match l.local(token, &key) {
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
            move |ctx: Ctx<'js>, token: f64, key: String| match l.local(token, &key) {
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
                let writes = answer(&ctx, l.lend_writes(token))?;
                let request = HostRequest::Scan {
                    prefix,
                    start,
                    exclusive,
                    limit,
                    writes,
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
                let put = l.write(token, |writes, writable| {
                    writes.put_json_text(writable, key, &value)
                });
                answer(&ctx, put).map(drop)
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "del",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| {
                let existed = match l.local(token, &key) {
                    Some(value) => value.is_some(),
                    None => {
                        let has = answer(&ctx, l.ask(token, HostRequest::Has(key.clone())))?;
                        has.as_deref() == Some("true")
                    }
                };
                answer(
                    &ctx,
                    l.write(token, |writes, writable| writes.del(writable, key)),
                )?;
                rquickjs::Result::Ok(existed)
            },
        )?,
    )?;
    Ok(host)
}

/// A reply as the host function's result, or an `Error` thrown in JavaScript.
fn answer<T>(ctx: &Ctx<'_>, reply: Result<T, String>) -> rquickjs::Result<T> {
    reply.map_err(|message| rquickjs::Exception::throw_message(ctx, &message))
}
