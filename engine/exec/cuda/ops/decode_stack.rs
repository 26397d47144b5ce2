//! The persistent decode stack of [`CudaOps`] (`--persistent-decode`, `kernels/decode_layers.cu`): a table of this
//! model's layers (bf16 or W4A16 projections) built when the switch is turned on, and the [`Ops::decoder_layers`]
//! hook that runs a decode step's layers through it in one launch (the bits of the layers one by one at 8-warp gemv
//! tiles, or at 8 W4A16 K splits).

use super::*;

/// Layer `l`'s four projections for the persistent decode stack: all bf16, or all symmetric W4A16; anything else
/// (W4A8, zero points, a mix) is refused with the layer and projection named.
fn stack_weights(layer: &DeviceLayer, l: usize) -> Result<k::decode_layers::StackWeights<'_>> {
    let projections = [("qkv", &layer.wqkv), ("o", &layer.wo), ("gate_up", &layer.w_gate_up), ("down", &layer.w_down)];
    if let [DeviceLinear::Dense(qkv), DeviceLinear::Dense(o), DeviceLinear::Dense(gate_up), DeviceLinear::Dense(down)] =
        projections.map(|p| p.1)
    {
        return Ok(k::decode_layers::StackWeights::Bf16 { qkv, o, gate_up, down });
    }
    let mut quant = Vec::with_capacity(4);
    for (name, w) in projections {
        match w {
            DeviceLinear::Quant(q) if !q.is_w4a8() && !q.has_zeros() => quant.push(q.as_ref()),
            DeviceLinear::Quant(q) => {
                let why = if q.is_w4a8() { "W4A8" } else { "W4A16 with zero points" };
                return Err(Error::request(format!(
                    "the persistent decode stack takes bf16 or symmetric W4A16 weights; layer {l} `{name}` is \
                     quantized {why}"
                )));
            }
            DeviceLinear::Dense(_) => {
                return Err(Error::request(format!(
                    "the persistent decode stack takes all four projections of a layer in one format; layer {l} \
                     `{name}` is bf16 and another is quantized"
                )))
            }
        }
    }
    Ok(k::decode_layers::StackWeights::W4A16 { qkv: quant[0], o: quant[1], gate_up: quant[2], down: quant[3] })
}

/// The persistent decode stack (`kernels/decode_layers.cu`) over this model's layers.
pub(super) struct DecodeStack {
    table: k::decode_layers::LayerTable,
    scratch: k::decode_layers::StackScratch,
}

impl CudaOps {
    /// True while the persistent decode stack is switched on.
    pub(in crate::exec::cuda) fn stack_enabled(&self) -> bool {
        self.stack.is_some()
    }

    /// The model's sizes as the persistent decode stack takes them.
    fn stack_shape(&self) -> k::decode_layers::StackShape {
        k::decode_layers::StackShape {
            layout: self.layout,
            hidden: self.cfg.hidden_size,
            inter: self.cfg.intermediate_size,
            eps: self.cfg.rms_norm_eps,
            num_slots: self.num_blocks * self.layout.block_size,
        }
    }

    /// Switches the persistent decode stack on or off. On, decode steps of up to
    /// [`k::decode_layers::MAX_M`] sequences run every decoder layer in one launch (the same bits as the layers one
    /// by one with 8-warp gemv tiles, or W4A16 at 8 K splits); other steps run as before. It needs bf16 or
    /// symmetric W4A16 projections on one GPU.
    pub(in crate::exec::cuda) fn set_persistent_decode(&mut self, on: bool) -> Result<()> {
        if !on {
            self.stack = None;
            return Ok(());
        }
        if self.stack.is_some() {
            return Ok(());
        }
        if self.tp.is_some() {
            return Err(Error::request("the persistent decode stack runs on one GPU, not under tensor parallelism"));
        }
        let shape = self.stack_shape();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            layers.push(k::decode_layers::StackLayer {
                attn_norm: &layer.attn_norm,
                mlp_norm: &layer.mlp_norm,
                weights: stack_weights(layer, l)?,
                k_cache: &self.k_cache[l],
                v_cache: &self.v_cache[l],
            });
        }
        // SAFETY: the weights and caches are this executor's, allocated once and never moved or freed while it
        // lives; the table lives in `self.stack` and is only launched on `self.stream`, which orders every use of
        // the caches.
        let table = unsafe { k::decode_layers::LayerTable::new(&self.stream, shape, &layers)? };
        let scratch = k::decode_layers::StackScratch::new(&self.stream, shape.layout.num_kv_heads)?;
        self.stack = Some(DecodeStack { table, scratch });
        // Graphs captured before ran the layers one by one.
        self.generation += 1;
        Ok(())
    }

    /// Turns the stack's phase timing on or off (profiling, [`stack_phases`](Self::stack_phases)); on needs the
    /// stack on.
    pub(in crate::exec::cuda) fn set_stack_timing(&mut self, on: bool) -> Result<()> {
        let (stream, blocks) = (self.stream.clone(), self.num_sms);
        let Some(stack) = self.stack.as_mut() else {
            if on {
                return Err(Error::request("phase timing of the persistent decode stack needs the stack on"));
            }
            return Ok(());
        };
        if stack.scratch.timing() == on {
            return Ok(());
        }
        if on {
            stack.scratch.enable_timing(&stream, stack.table.num_layers(), blocks)?;
        } else {
            stack.scratch.disable_timing();
        }
        // Graphs captured before hold the launch with the old timestamp pointer.
        self.generation += 1;
        Ok(())
    }

    /// The phases of the stack's last timed launch; `None` while the stack or its timing is off.
    pub(in crate::exec::cuda) fn stack_phases(&self) -> Result<Option<k::decode_layers::StackPhases>> {
        match &self.stack {
            Some(stack) => stack.scratch.phase_times(&self.stream),
            None => Ok(None),
        }
    }

    /// [`Ops::decoder_layers`]: the step's layers through the stack when it is on and takes the step.
    pub(super) fn run_decode_stack(&mut self, bufs: LayerBufs<'_, CudaAct>) -> Result<bool> {
        let sz = self.sizes;
        let m = sz.tokens;
        let Some(stack) = self.stack.as_mut() else {
            return Ok(false);
        };
        // The table's shape was checked when it was built; max_m (at most MAX_M) bounds the sequences.
        if !sz.decode || sz.seqs != m || !(1..=stack.table.max_m()).contains(&m) {
            return Ok(false);
        }
        if self.pending_norm.is_some() || self.quant.pending.is_some() {
            return Err(Error::Backend("decoder_layers: a fused operation is pending".into()));
        }
        let c = &self.cfg;
        let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
        check("decoder_layers x", bufs.x, m, c.hidden_size)?;
        check("decoder_layers delta", bufs.delta, m, c.hidden_size)?;
        check("decoder_layers qkv", bufs.qkv, m, qkv_width)?;
        check("decoder_layers attn", bufs.attn, m, c.q_dim())?;
        check("decoder_layers act", bufs.act, m, c.intermediate_size)?;
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        let num_splits = k::attention::decode_num_splits(&self.layout, m, sz.max_context_len, self.num_sms);
        let io = LayerBufs {
            x: &mut bufs.x.buf,
            delta: &mut bufs.delta.buf,
            qkv: &mut bufs.qkv.buf,
            attn: &mut bufs.attn.buf,
            act: &mut bufs.act.buf,
        };
        let step_meta = k::decode_layers::StackMeta {
            positions: &meta.positions.slice(..m),
            slot_mapping: &meta.slots.slice(..m),
            inv_freq: &self.inv_freq,
            block_tables: &meta.block_tables.slice(..sz.table_len),
            max_blocks_per_seq: sz.max_blocks_per_seq,
            num_splits,
        };
        k::decode_layers::decode_layers(
            &self.stream,
            &stack.table,
            m,
            io,
            &step_meta,
            &mut self.workspace,
            &mut stack.scratch,
        )?;
        self.stack_launches += 1;
        Ok(true)
    }
}
