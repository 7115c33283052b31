// The benchmark's JavaScript mutators (REPLISYNC_MUTATORS): `jsIncrement` does what the
// built-in `increment` does, so the two can be compared on the same server.
export const mutators = {
  async jsIncrement(tx, { key, delta }) {
    const current = (await tx.get(key)) ?? 0;
    await tx.set(key, current + delta);
  },
};
