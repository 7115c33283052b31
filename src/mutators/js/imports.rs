//! What an engine answers a module's `import` (static, or `import()` in a mutator): a refusal
//! saying that replisync loads one self-contained module, and how to bundle one.

use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::module::Declared;
use rquickjs::{Ctx, Exception, Module, Result};

/// The command the refusal suggests, for a TypeScript source and what it imports.
const BUNDLE_COMMAND: &str =
    "npx esbuild src/mutators.ts --bundle --format=esm --outfile=mutators.js";

/// Refuses every import, throwing an `Error` that names the importing file and the specifier.
pub(super) struct RefuseImports;

impl Resolver for RefuseImports {
    fn resolve<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<String> {
        Err(Exception::throw_message(ctx, &refusal(base, name)))
    }
}

impl Loader for RefuseImports {
    /// Never reached (every name fails to resolve); refuses all the same.
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<Module<'js, Declared>> {
        Err(Exception::throw_message(
            ctx,
            &refusal("the mutators module", name),
        ))
    }
}

/// The refusal of `base`'s import of `name`.
fn refusal(base: &str, name: &str) -> String {
    format!(
        "{base} imports {name:?}, but replisync loads a single self-contained ES module \
         (REPLISYNC_MUTATORS) and imports nothing: bundle the mutators and what they import into \
         one file, e.g. `{BUNDLE_COMMAND}`, and point REPLISYNC_MUTATORS at that file (see \
         docs/javascript-mutators.md, \"TypeScript and imports: bundle into one file\")"
    )
}
