//! The contexts an engine keeps between pushes, one per recently served space, the least
//! recently used dropped first: a space's next push on the engine need not load the module again.

use std::collections::VecDeque;
use std::rc::Rc;

use rquickjs::{Context, Function, Object, Persistent};

use super::host::Link;
use crate::mutators::ScriptError;

/// The module's `makeTx` and mutators, saved in their context.
pub(super) type SavedModule = (Persistent<Function<'static>>, Persistent<Object<'static>>);

/// One space's context, with the module loaded (or the error loading it gave), and the link its
/// host functions ask through (attached to each push's session in turn).
pub(super) struct SpaceContext {
    pub space: String,
    pub link: Rc<Link>,
    pub loaded: Result<SavedModule, ScriptError>,
    pub context: Context,
}

/// The kept contexts, the least recently used first. Its owner drops them before their runtime
/// (a context outliving its runtime aborts the process).
#[derive(Default)]
pub(super) struct KeptContexts {
    by_recency: VecDeque<SpaceContext>,
}

impl KeptContexts {
    /// Takes `space`'s context out, if it is kept.
    pub(super) fn take(&mut self, space: &str) -> Option<SpaceContext> {
        let at = self
            .by_recency
            .iter()
            .position(|kept| kept.space == space)?;
        self.by_recency.remove(at)
    }

    /// Keeps `context` as the most recently used.
    pub(super) fn keep(&mut self, context: SpaceContext) {
        self.by_recency.push_back(context);
    }

    /// Drops the `count` least recently used contexts; answers how many it dropped.
    pub(super) fn drop_oldest(&mut self, count: usize) -> usize {
        let count = count.min(self.by_recency.len());
        self.by_recency.drain(..count);
        count
    }

    pub(super) fn clear(&mut self) {
        self.by_recency.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.by_recency.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_recency.is_empty()
    }
}
