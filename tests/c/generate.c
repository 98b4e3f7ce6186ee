/* Generates token ids from the tiny model of `small4 generate` through the C ABI (linked against the shared
 * library). Usage: generate BACKEND MAX_TOKENS ID [ID...], BACKEND one of reference, sim, gpu. Prints
 * "generated: ID ID ..." like `small4 generate --prompt-ids`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "small4.h"

static int fail(const char *what, Small4Status status) {
    fprintf(stderr, "%s failed with status %d: %s\n", what, (int)status, small4_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s reference|sim|gpu MAX_TOKENS ID [ID...]\n", argv[0]);
        return 2;
    }
    if (small4_abi_version() != SMALL4_ABI_VERSION) {
        fprintf(stderr, "small4.h is ABI %u but the library is ABI %u\n", (unsigned)SMALL4_ABI_VERSION, small4_abi_version());
        return 1;
    }
    Small4GeneratorOptions options = small4_generator_options_default();
    if (strcmp(argv[1], "reference") == 0) {
        options.backend = SMALL4_BACKEND_REFERENCE;
    } else if (strcmp(argv[1], "sim") == 0) {
        options.backend = SMALL4_BACKEND_SIM;
    } else if (strcmp(argv[1], "gpu") == 0) {
        options.backend = SMALL4_BACKEND_GPU;
    } else {
        fprintf(stderr, "unknown backend %s\n", argv[1]);
        return 2;
    }
    options.eos = -1; /* like `small4 generate --prompt-ids` on the reference: to MAX_TOKENS */
    size_t max_tokens = strtoul(argv[2], NULL, 10);
    size_t prompt_len = (size_t)(argc - 3);
    uint32_t *prompt = malloc(prompt_len * sizeof *prompt);
    uint32_t *tokens = malloc((max_tokens ? max_tokens : 1) * sizeof *tokens);
    for (size_t i = 0; i < prompt_len; i++) prompt[i] = (uint32_t)strtoul(argv[3 + i], NULL, 10);
    options.max_context = prompt_len + max_tokens;

    char path[4096];
    size_t path_len = 0;
    Small4Status status = small4_tiny_checkpoint("bf16", 4, path, sizeof path, &path_len);
    if (status != SMALL4_STATUS_OK) return fail("small4_tiny_checkpoint", status);

    Small4Generator *generator = NULL;
    status = small4_generator_open(path, &options, &generator);
    if (status != SMALL4_STATUS_OK) return fail("small4_generator_open", status);

    /* A bad call is a status and a message, never a crash: a prompt id outside the vocabulary. */
    size_t vocab = 0, generated = 0;
    status = small4_generator_vocab(generator, &vocab);
    if (status != SMALL4_STATUS_OK) return fail("small4_generator_vocab", status);
    uint32_t bad_prompt[1] = {(uint32_t)vocab};
    status = small4_generate(generator, bad_prompt, 1, max_tokens, NULL, tokens, &generated);
    if (status != SMALL4_STATUS_OUT_OF_RANGE || strlen(small4_last_error()) == 0) {
        fprintf(stderr, "an out-of-vocabulary prompt gave status %d (%s)\n", (int)status, small4_last_error());
        return 1;
    }
    printf("out-of-vocabulary prompt: %s\n", small4_last_error());

    status = small4_generate(generator, prompt, prompt_len, max_tokens, NULL, tokens, &generated);
    if (status != SMALL4_STATUS_OK) return fail("small4_generate", status);
    printf("generated:");
    for (size_t i = 0; i < generated; i++) printf(" %u", tokens[i]);
    printf("\n");

    /* Seeded sampling: the same seed gives the same tokens (the engine backends); the reference refuses it. */
    Small4Sampling sampling = {1.5f, 0.95f, 11};
    uint32_t *again = malloc((max_tokens ? max_tokens : 1) * sizeof *again);
    size_t generated_again = 0;
    status = small4_generate(generator, prompt, prompt_len, max_tokens, &sampling, tokens, &generated);
    if (options.backend == SMALL4_BACKEND_REFERENCE) {
        if (status != SMALL4_STATUS_INVALID_ARGUMENT) return fail("seeded sampling on the reference (expected INVALID_ARGUMENT)", status);
    } else {
        if (status != SMALL4_STATUS_OK) return fail("small4_generate (seeded)", status);
        status = small4_generate(generator, prompt, prompt_len, max_tokens, &sampling, again, &generated_again);
        if (status != SMALL4_STATUS_OK) return fail("small4_generate (seeded, again)", status);
        if (generated != generated_again || memcmp(tokens, again, generated * sizeof *tokens) != 0) {
            fprintf(stderr, "the same seed gave different tokens\n");
            return 1;
        }
        printf("seeded:");
        for (size_t i = 0; i < generated; i++) printf(" %u", tokens[i]);
        printf("\n");
    }
    free(again);

    small4_generator_free(generator);
    free(prompt);
    free(tokens);
    return 0;
}
