//! The deterministic stack-depth bound: a rewrite of every module before it is compiled.
//!
//! wasmtime's own guard traps when native stack runs out, at a depth that depends on the
//! compiler's frame layout, hence on the wasmtime build and the CPU. Replicas must agree on
//! whether a deep recursion traps, so the rewritten module keeps its own count in *stack units*:
//! an `i32` global imported from the host (`wraft::stack_units`) holds the units still
//! available. Every function body
//!
//! 1. on entry, traps if fewer than its cost remain (after setting the global to
//!    [`EXHAUSTED`], which is how the host tells this trap from the module's own
//!    `unreachable`), else subtracts its cost;
//! 2. runs its original code inside one new outer `block`, with `return` turned into a branch
//!    to that block, so that every normal way out of the function (falling off the end,
//!    `return`, a branch to the function's label) passes through
//! 3. the epilogue, which gives the cost back.
//!
//! A trap does not give units back; it poisons the instance anyway, and the host resets the
//! global before every call it makes.
//!
//! A function's cost is [`FRAME_UNITS`] plus one unit per parameter, per declared local, per
//! result and per value of the deepest operand stack the validator sees in its body: everything
//! Cranelift may keep in a frame slot, its arguments to and results from the functions it calls
//! included (they pass through the operand stack), and a second slot for results, which are
//! often both in a callee's return area and spilled. See [`crate::engine`] for how units relate
//! to native stack bytes.
//!
//! Keeps true: the rewritten module computes exactly what the original does (it only adds an
//! imported global, which shifts the module's global indices by one, and, for functions with
//! several results, one block type per distinct result list; custom sections other than names
//! are dropped). It may import functions (wraft's host functions, checked by the engine) but no
//! globals, tables or memories, so the counter is global 0.

use std::collections::HashMap;

use wasm_encoder::reencode::{self, Reencode, RoundtripReencoder};
use wasm_encoder::{BlockType, CodeSection, EntityType, GlobalType, Instruction};
use wasmparser::{
    FuncType, FuncValidatorAllocations, Operator, OperatorsReader, Parser, Payload, ValidPayload,
    Validator, WasmFeatures,
};

use crate::WasmError;

#[cfg(test)]
mod tests;

/// Version of this rewrite; part of [`crate::ENGINE`] and of the compile-cache key, so it must
/// change whenever the rewritten code or the cost of a function changes.
pub(crate) const VERSION: u32 = 1;

/// Module and field of the imported counter.
pub(crate) const IMPORT_MODULE: &str = "wraft";
pub(crate) const IMPORT_NAME: &str = "stack_units";

/// The counter's value once the bound has tripped; the host reads it after a trap. Normal
/// values lie in `0..=i32::MAX` because the limit does.
pub(crate) const EXHAUSTED: i32 = -1;

/// Units every frame costs on top of its values: return address, saved frame pointer and
/// callee-saved registers, alignment, and the two values of the prologue itself.
pub(crate) const FRAME_UNITS: u32 = 4;

/// What the rewrite needs to know about one function defined by the module.
struct FuncInfo {
    cost: u32,
    /// The type of the outer block: the function's results, taking no parameters.
    wrapper: BlockType,
}

/// The result of the first pass over the module.
struct Analysis {
    funcs: Vec<FuncInfo>,
    /// Block types `[] -> results` to append to the type section, for functions with several
    /// results (a block with one result or none needs no type entry).
    new_types: Vec<Vec<wasmparser::ValType>>,
}

/// The cost of each defined function of an instrumented module, by defined-function index;
/// for tests.
#[cfg(test)]
pub(crate) fn costs(wasm: &[u8]) -> Result<Vec<u32>, WasmError> {
    Ok(analyze(wasm)?.funcs.iter().map(|f| f.cost).collect())
}

/// Rewrites a validated module (see the module docs). `wasm` must already have passed the
/// engine's validation: this pass relies on it for the features it accepts.
pub(crate) fn instrument(wasm: &[u8]) -> Result<Vec<u8>, WasmError> {
    let analysis = analyze(wasm)?;
    let mut rewriter = Rewriter {
        analysis: &analysis,
        next_body: 0,
        import_added: false,
    };
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| WasmError::Invalid(format!("cannot add the stack bound: {}", describe(&e))))?;
    Ok(module.finish())
}

/// First pass: validates again (for the operand stack heights, which only the validator
/// tracks), refuses imports other than functions, and computes every function's cost and outer block type.
fn analyze(wasm: &[u8]) -> Result<Analysis, WasmError> {
    let invalid = |e: wasmparser::BinaryReaderError| WasmError::Invalid(e.to_string());
    // The engine has already refused every feature wraft does not accept; this pass only has
    // to understand what is left, so it may accept more.
    let mut validator = Validator::new_with_features(WasmFeatures::default());
    let mut types: Vec<FuncType> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut funcs = Vec::new();
    let mut new_types: Vec<Vec<wasmparser::ValType>> = Vec::new();
    let mut new_type_index: HashMap<Vec<wasmparser::ValType>, u32> = HashMap::new();
    let mut allocations = FuncValidatorAllocations::default();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(invalid)?;
        match &payload {
            Payload::ImportSection(reader) => {
                // Functions only (the engine checks them against the host's allow-list): an
                // imported global would take the counter's index.
                for import in reader.clone().into_imports() {
                    let import = import.map_err(invalid)?;
                    if !matches!(import.ty, wasmparser::TypeRef::Func(_)) {
                        return Err(WasmError::ImportNotAllowed {
                            module: import.module.to_string(),
                            name: import.name.to_string(),
                        });
                    }
                }
            }
            Payload::TypeSection(reader) => {
                for ty in reader.clone().into_iter_err_on_gc_types() {
                    types.push(ty.map_err(invalid)?);
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader.clone() {
                    func_types.push(ty.map_err(invalid)?);
                }
            }
            _ => {}
        }
        if let ValidPayload::Func(func, body) = validator.payload(&payload).map_err(invalid)? {
            let defined = funcs.len();
            let ty = func_types
                .get(defined)
                .and_then(|&t| types.get(t as usize))
                .ok_or_else(|| {
                    WasmError::Invalid(format!("function {defined} has no known type"))
                })?;
            let mut validator = func.into_validator(allocations);
            let mut reader = body.get_binary_reader();
            validator.read_locals(&mut reader).map_err(invalid)?;
            // Parameters count among the locals.
            let locals = validator.len_locals();
            let mut ops = OperatorsReader::new(reader);
            let mut deepest = 0u32;
            while !ops.eof() {
                let (op, offset) = ops.read_with_offset().map_err(invalid)?;
                if let Operator::ReturnCall { .. }
                | Operator::ReturnCallIndirect { .. }
                | Operator::ReturnCallRef { .. } = op
                {
                    // Would leave the function without the epilogue; the engine refuses tail
                    // calls, so this is only a second line of defence.
                    return Err(WasmError::Invalid(
                        "tail calls are not supported".to_string(),
                    ));
                }
                validator.op(offset, &op).map_err(invalid)?;
                deepest = deepest.max(validator.operand_stack_height());
            }
            ops.finish().map_err(invalid)?;
            allocations = validator.into_allocations();
            let cost = FRAME_UNITS
                .saturating_add(locals)
                .saturating_add(ty.results().len() as u32)
                .saturating_add(deepest)
                // Keeps `i32.const cost` positive and the comparison unsigned-safe.
                .min(i32::MAX as u32);
            let wrapper = match ty.results() {
                [] => BlockType::Empty,
                [one] => BlockType::Result(val_type(*one)?),
                several => {
                    let index = match new_type_index.get(several) {
                        Some(&index) => index,
                        None => {
                            let index = u32::try_from(types.len() + new_types.len())
                                .map_err(|_| WasmError::Invalid("too many types".to_string()))?;
                            new_types.push(several.to_vec());
                            new_type_index.insert(several.to_vec(), index);
                            index
                        }
                    };
                    BlockType::FunctionType(index)
                }
            };
            funcs.push(FuncInfo { cost, wrapper });
        }
    }
    Ok(Analysis { funcs, new_types })
}

fn val_type(ty: wasmparser::ValType) -> Result<wasm_encoder::ValType, WasmError> {
    RoundtripReencoder
        .val_type(ty)
        .map_err(|e| WasmError::Invalid(format!("cannot add the stack bound: {}", describe(&e))))
}

/// The second pass: a re-encoding of the module with the counter, the block types and the
/// rewritten bodies.
struct Rewriter<'a> {
    analysis: &'a Analysis,
    /// Index of the next body in the code section (and of its entry in `Analysis::funcs`).
    next_body: usize,
    import_added: bool,
}

/// The counter's import type: a mutable i32 global.
fn counter_type() -> EntityType {
    EntityType::Global(GlobalType {
        val_type: wasm_encoder::ValType::I32,
        mutable: true,
        shared: false,
    })
}

/// The counter is the first global: imported globals precede defined ones, and a module may
/// import only functions.
const COUNTER: u32 = 0;

impl Reencode for Rewriter<'_> {
    type Error = String;

    fn global_index(&mut self, global: u32) -> Result<u32, reencode::Error<String>> {
        global
            .checked_add(1)
            .ok_or_else(|| reencode::Error::UserError("too many globals".to_string()))
    }

    fn intersperse_section_hook(
        &mut self,
        module: &mut wasm_encoder::Module,
        _after: Option<wasm_encoder::SectionId>,
        before: Option<wasm_encoder::SectionId>,
    ) -> Result<(), reencode::Error<String>> {
        // The import section comes right after the type section. A module with imports of
        // its own gets the counter added to its section (`parse_import_section`).
        if !self.import_added
            && before != Some(wasm_encoder::SectionId::Type)
            && before != Some(wasm_encoder::SectionId::Import)
        {
            let mut imports = wasm_encoder::ImportSection::new();
            imports.import(IMPORT_MODULE, IMPORT_NAME, counter_type());
            module.section(&imports);
            self.import_added = true;
        }
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut wasm_encoder::ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> Result<(), reencode::Error<String>> {
        reencode::utils::parse_import_section(self, imports, section)?;
        imports.import(IMPORT_MODULE, IMPORT_NAME, counter_type());
        self.import_added = true;
        Ok(())
    }

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), reencode::Error<String>> {
        reencode::utils::parse_type_section(self, types, section)?;
        for results in &self.analysis.new_types {
            let results = results
                .iter()
                .map(|&t| self.val_type(t))
                .collect::<Result<Vec<_>, _>>()?;
            types.ty().function([], results);
        }
        Ok(())
    }

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), reencode::Error<String>> {
        // Only names are kept: other custom sections (DWARF, branch hints, producers) may hold
        // code offsets that the rewrite invalidates, and none changes what a module computes.
        // A malformed name section does not make a module invalid either: it is dropped too.
        if let wasmparser::KnownCustom::Name(names) = section.as_known() {
            if let Ok(names) = self.custom_name_section(names) {
                module.section(&names);
            }
        }
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> Result<(), reencode::Error<String>> {
        let info = self
            .analysis
            .funcs
            .get(self.next_body)
            .ok_or_else(|| reencode::Error::UserError("more bodies than functions".into()))?;
        self.next_body += 1;
        let cost = info.cost as i32;
        let mut f = self.new_function_with_parsed_locals(&func)?;
        f.instruction(&Instruction::GlobalGet(COUNTER))
            .instruction(&Instruction::I32Const(cost))
            .instruction(&Instruction::I32LtU)
            .instruction(&Instruction::If(BlockType::Empty))
            .instruction(&Instruction::I32Const(EXHAUSTED))
            .instruction(&Instruction::GlobalSet(COUNTER))
            .instruction(&Instruction::Unreachable)
            .instruction(&Instruction::End)
            .instruction(&Instruction::GlobalGet(COUNTER))
            .instruction(&Instruction::I32Const(cost))
            .instruction(&Instruction::I32Sub)
            .instruction(&Instruction::GlobalSet(COUNTER))
            .instruction(&Instruction::Block(info.wrapper));
        // Blocks open inside the original body; a `return` at depth d becomes `br d`, which
        // names the outer block. Branches to the function's own label need no change: that
        // label is now the outer block's.
        let mut depth = 0u32;
        let mut reader = func.get_operators_reader()?;
        while !reader.eof() {
            let op = reader.read()?;
            match op {
                Operator::Block { .. }
                | Operator::Loop { .. }
                | Operator::If { .. }
                | Operator::Try { .. }
                | Operator::TryTable { .. } => depth += 1,
                Operator::End if depth == 0 => {
                    f.instruction(&Instruction::End)
                        .instruction(&Instruction::GlobalGet(COUNTER))
                        .instruction(&Instruction::I32Const(cost))
                        .instruction(&Instruction::I32Add)
                        .instruction(&Instruction::GlobalSet(COUNTER))
                        .instruction(&Instruction::End);
                    continue;
                }
                Operator::End | Operator::Delegate { .. } => depth = depth.saturating_sub(1),
                Operator::Return => {
                    f.instruction(&Instruction::Br(depth));
                    continue;
                }
                _ => {}
            }
            f.instruction(&self.instruction(op)?);
        }
        code.function(&f);
        Ok(())
    }
}

/// wasm-encoder's error display hides the parser's message.
fn describe<E: std::fmt::Display>(error: &reencode::Error<E>) -> String {
    match error {
        reencode::Error::ParseError(e) => e.to_string(),
        other => other.to_string(),
    }
}
